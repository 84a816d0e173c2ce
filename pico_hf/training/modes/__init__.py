"""Training modes: research variants of pretraining behind one interface (`TrainingMode`).

ReLoRA (`pico_hf.training.relora`) and MAML (`pico_hf.training.maml`) are modes; a new one is one module with a
`TrainingMode` subclass decorated with `@register_mode`. Its section `training.<key>` is then a config key, and
the config, the run builder and `PicoTrainer` call its hooks without naming it.
"""

from .base import TrainingMode
from .registry import (
    build_mode,
    check_modes,
    enabled_modes,
    mode_sections,
    register_mode,
    registered_modes,
    unregister_mode,
)

__all__ = [
    "TrainingMode",
    "build_mode",
    "check_modes",
    "enabled_modes",
    "mode_sections",
    "register_mode",
    "registered_modes",
    "unregister_mode",
]
