"""`TrainingMode`: the interface a research mode of pretraining (ReLoRA, MAML, ...) implements.

A mode owns one config section, `training.<key>`, a dataclass with an `enabled` flag (off by default); at most
one mode is enabled in a run. The config checks it with `check_config`; the run builder makes one instance per
run and calls `prepare_model` and `callbacks`; `PicoTrainer` calls the other hooks. Every hook has a default
that leaves the plain run as it is, so a mode overrides only what it changes.

The config is read before torch is imported (a config error is reported at once), so the class that declares a
section imports nothing heavy. A mode whose hooks need torch at import time names them in `implementation`:
a subclass in another module, imported when a run builds the mode.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:  # the config reads the sections without importing torch: the hooks' types only
    import torch
    from torch import nn
    from transformers import TrainerCallback

    from ..trainer import PicoTrainer


class TrainingMode:
    """One research mode of pretraining. Subclass it in one module and decorate it with `@register_mode`."""

    # The config section's name, `training.<key>`, and its dataclass (which must have `enabled: bool = False`).
    key: ClassVar[str]
    config_class: ClassVar[type]
    # "module:Class", a subclass of this class that implements the hooks, or None: this class does.
    implementation: ClassVar[str | None] = None

    def __init__(self, config: Any) -> None:
        # `config` is the run's whole PicoTrainingConfig: modes may read the model, data and training sections.
        self.config = config
        self.section = getattr(config.training, self.key)
        self.trainer: PicoTrainer | None = None

    # --- the config ---------------------------------------------------------------------------------------

    @classmethod
    def check_config(cls, section: Any, config: Any) -> list[str]:
        """Problems with the enabled section that need no data, model or process group, each naming its key."""
        return []

    # --- building the run ---------------------------------------------------------------------------------

    def prepare_model(
        self, model: nn.Module, *, tokenizer: Any, micro_batch: int, world_size: int
    ) -> nn.Module:
        """Before the Trainer is built: check what needs the tokenizer or the batch layout, warm-start or wrap
        the model; returns the model to train."""
        return model

    def start_position(self) -> dict[str, Any] | None:
        """Where a fresh run starts: the saved data position (`{"step": N, ...}`) of a checkpoint whose steps
        it continues, or None for step 0. A resumed run starts from its own checkpoint instead."""
        return None

    def callbacks(self) -> list[TrainerCallback]:
        """The mode's Trainer callbacks, placed ahead of the run's loggers and checkpoint contributors (the values
        they add to a log line reach every logger). The series a mode logs are its callbacks' or
        `update_training_log`'s (e.g. `maml/*` on every training log line, `relora/*` at each reset)."""
        return []

    def attach(self, trainer: PicoTrainer) -> None:
        """The Trainer that runs this mode, once it is built (its device and accelerator are known)."""
        self.trainer = trainer

    # --- the training step --------------------------------------------------------------------------------

    def create_optimizer(
        self, model: nn.Module, create: Callable[[], torch.optim.Optimizer]
    ) -> torch.optim.Optimizer:
        """The optimizer: `create()` makes the Trainer's own over `model`'s trainable parameters."""
        return create()

    def lr_multiplier(self, num_training_steps: int) -> Callable[[int], float] | None:
        """The learning rate's multiplier for each optimizer step (0-based), or None for the Trainer's own
        schedule (linear warmup and decay)."""
        return None

    def compute_loss(self, model: nn.Module, inputs: dict[str, Any]) -> torch.Tensor | None:
        """The loss of a training micro-batch, a mean over it, or None for the language-modelling loss."""
        return None

    def update_training_log(self, logs: dict[str, float]) -> None:
        """A training log line (the Trainer's `loss` and the rest) before it is recorded and reaches the loggers,
        on every process (collectives are allowed): the mode may replace or remove `loss` and add its series."""

    # --- checkpoints --------------------------------------------------------------------------------------

    def checkpoint_weights(self, model: nn.Module) -> dict[str, torch.Tensor] | None:
        """The state dict the checkpoint's model files hold (a plain pico-decoder's), or None for the model's
        own. `model` is the unwrapped model."""
        return None

    def save_state(self, state_dir: Path) -> None:
        """Write what else resuming needs into the checkpoint's state folder (on the saving process)."""

    def resume(
        self, state_dir: Path, model: nn.Module, weights: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Load what `save_state` wrote; `weights` is the state dict of the checkpoint's model files, and the
        result is the state dict the live (unwrapped) `model` loads."""
        return weights
