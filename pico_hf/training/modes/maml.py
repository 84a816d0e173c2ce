"""MAML's section, `training.maml`, and its checks; the mode's hooks are in `pico_hf.training.maml`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ...configuration import ConfigError
from .base import TrainingMode
from .registry import register_mode


@dataclass
class MAMLConfig:
    """MAML pretraining (`pico_hf.training.maml`): first-order MAML on SMLMT episodes mixed with LM steps.
    Defaults are the settings of Africa et al. 2025 (pico-maml-train's key names where it has them)."""

    enabled: bool = False
    hybrid_ratio: float = 0.5  # share of optimizer steps that are meta steps
    n_way: int = 32  # classes (token types) per episode
    k_shot: int = 4  # support examples per class
    n_query: int = 1  # query examples per class
    inner_steps: int = 10
    inner_lr: float = 0.01
    first_order: bool = True  # false: the outer gradient goes through the unrolled inner loop
    head_hidden_dim: int = 128
    head_num_layers: int = 4
    mask_token: int | None = (
        None  # the id that replaces the episode's tokens; null: the tokenizer's pad token
    )
    # Meta steps train on query loss + lm_loss_weight x the masked micro-batch's LM loss (pico-maml-train adds
    # its meta loss to the LM loss: weight 1).
    lm_loss_weight: float = 1.0


def check_maml_config(maml: MAMLConfig, vocab_size: int) -> None:
    """Value checks that need no data: every key of `training.maml` in its range."""
    if not 0.0 <= maml.hybrid_ratio <= 1.0:
        raise ConfigError(f"training.maml.hybrid_ratio must be between 0 and 1, got {maml.hybrid_ratio}")
    at_least = {
        "n_way": 2,
        "k_shot": 1,
        "n_query": 1,
        "inner_steps": 0,
        "head_hidden_dim": 1,
        "head_num_layers": 1,
    }
    for key, low in at_least.items():
        if getattr(maml, key) < low:
            raise ConfigError(f"training.maml.{key} must be at least {low}, got {getattr(maml, key)}")
    for key in ("inner_lr", "lm_loss_weight"):
        if getattr(maml, key) < 0:
            raise ConfigError(f"training.maml.{key} must be non-negative, got {getattr(maml, key)}")
    if maml.n_way >= vocab_size:
        raise ConfigError(
            f"training.maml.n_way ({maml.n_way}) must be smaller than model.vocab_size ({vocab_size})"
        )
    if maml.mask_token is not None and not 0 <= maml.mask_token < vocab_size:
        raise ConfigError(
            f"training.maml.mask_token ({maml.mask_token}) is not a token id below {vocab_size}"
        )


@register_mode
class MAML(TrainingMode):
    key = "maml"
    config_class = MAMLConfig
    implementation = "pico_hf.training.maml:MAMLMode"

    @classmethod
    def check_config(cls, section: MAMLConfig, config: Any) -> list[str]:
        try:
            check_maml_config(section, config.model.vocab_size)
        except ConfigError as error:
            return [str(error)]
        return []
