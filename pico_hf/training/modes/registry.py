"""The training modes by config key: `training.<key>` of each registered `TrainingMode`.

A mode registers itself when its module is imported (`@register_mode`). The modes shipped with pico-hf are
imported on first use, so the config knows their sections; a mode defined elsewhere registers when its module
is imported, before the config is loaded.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any

from ...configuration import ConfigError
from .base import TrainingMode

# The modes shipped with pico-hf (their sections; the hooks are in pico_hf/training/<name>.py), in the order
# their sections are listed.
BUILT_IN = ("pico_hf.training.modes.relora", "pico_hf.training.modes.maml")

_MODES: dict[str, type[TrainingMode]] = {}
_built_in_loaded = False


def register_mode(mode: type[TrainingMode]) -> type[TrainingMode]:
    """Class decorator: make `mode` the owner of the config section `training.<mode.key>`."""
    config_class = getattr(mode, "config_class", None)
    if not dataclasses.is_dataclass(config_class) or "enabled" not in {
        f.name for f in dataclasses.fields(config_class)
    }:
        raise TypeError(f"{mode.__name__}.config_class must be a dataclass with an `enabled` field")
    registered = _MODES.get(mode.key)
    if registered is not None and _name(registered) != _name(mode):
        raise TypeError(f"training.{mode.key} is already the section of {registered.__name__}")
    _MODES[mode.key] = mode  # the same class again (a re-imported module) replaces itself
    return mode


def unregister_mode(key: str) -> None:
    """Remove the mode of `training.<key>` (a mode registered for a while, e.g. by a test, and then dropped)."""
    _MODES.pop(key, None)


def _name(mode: type) -> str:
    return f"{mode.__module__}.{mode.__qualname__}"


def registered_modes() -> dict[str, type[TrainingMode]]:
    """Every registered mode by config key: the built-in ones first, the others in the order they registered."""
    global _built_in_loaded
    if not _built_in_loaded:
        _built_in_loaded = True
        for module in BUILT_IN:
            importlib.import_module(module)
    order = {module: index for index, module in enumerate(BUILT_IN)}
    return dict(sorted(_MODES.items(), key=lambda item: order.get(item[1].__module__, len(order))))


def mode_sections() -> dict[str, type]:
    """`training`'s mode sections: config key -> the mode's config dataclass."""
    return {key: mode.config_class for key, mode in registered_modes().items()}


def enabled_modes(config: Any) -> list[type[TrainingMode]]:
    return [mode for key, mode in registered_modes().items() if getattr(config.training, key).enabled]


def check_modes(config: Any) -> list[str]:
    """Problems with the enabled modes' sections, then with the choice of modes (at most one)."""
    enabled = enabled_modes(config)
    problems = [
        problem
        for mode in enabled
        for problem in mode.check_config(getattr(config.training, mode.key), config)
    ]
    if len(enabled) > 1:
        names = " and ".join(f"training.{mode.key}" for mode in enabled)
        problems.append(f"{names} cannot both be enabled: choose one research mode")
    return problems


def build_mode(config: Any) -> TrainingMode | None:
    """The run's enabled mode, or None for plain pretraining."""
    enabled = enabled_modes(config)
    if len(enabled) > 1:
        raise ConfigError(check_modes(config)[-1])
    if not enabled:
        return None
    mode = enabled[0]
    if mode.implementation is not None:
        module, _, name = mode.implementation.partition(":")
        mode = getattr(importlib.import_module(module), name)
    return mode(config)
