"""MAML's section, `training.maml`, and its checks; the mode's hooks are in `pico_hf.training.maml`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ...configuration import ConfigError
from .base import TrainingMode
from .registry import register_mode

OBJECTIVES = ("paper", "smlmt")
HEAD_INITS = ("xavier", "default")


@dataclass
class MAMLConfig:
    """MAML pretraining (`pico_hf.training.maml`): first-order MAML episodes mixed with language modelling.
    Defaults are the settings of Africa et al. 2025 (pico-maml-train's key names where it has them)."""

    enabled: bool = False
    # paper: pico-maml-train's episodes (K masked positions per sequence, classes from their tokens, a head over
    # the vocabulary) and each group of sequences meta or LM; smlmt: Bansal et al. 2020's N-way episodes with a
    # fresh label order and whole optimizer steps meta or LM.
    objective: str = "paper"
    # Episodes and the meta/LM choice are made on fixed groups of this many sequences of the global batch (the
    # same for any process count or accumulation); 64 is pico-maml-train's micro-batch (1024 / 4 GPUs / 4).
    episode_sequences: int = 64
    hybrid_ratio: float = 0.5  # paper: chance that a group is a meta episode; smlmt: share of meta steps
    n_way: int = 32  # classes (token types) per episode
    k_shot: int = 4  # paper: masked support positions per sequence; smlmt: support examples per class
    n_query: int = 1  # smlmt: query examples per class (paper: one query position per sequence)
    inner_steps: int = 10
    # pico-maml-train's 0.01 leaves a fresh head at chance after 10 steps, even on separable features (docs/maml.md)
    inner_lr: float = 0.1
    first_order: bool = True  # false: the outer gradient goes through the unrolled inner loop
    head_hidden_dim: int = 128
    head_num_layers: int = 4
    head_init: str = "xavier"  # xavier: xavier-uniform weights (pico-maml-train); default: nn.Linear's own
    mask_token: int | None = (
        None  # the id that replaces the episode's tokens; null: the tokenizer's pad token
    )
    # smlmt only: meta steps train on query loss + lm_loss_weight x the masked group's LM loss (paper: a meta
    # group trains on its query loss only, as pico-maml-train's meta branch does).
    lm_loss_weight: float = 1.0


def check_maml_config(maml: MAMLConfig, vocab_size: int) -> None:
    """Value checks that need no data: every key of `training.maml` in its range."""
    for key, allowed in (("objective", OBJECTIVES), ("head_init", HEAD_INITS)):
        if getattr(maml, key) not in allowed:
            raise ConfigError(
                f"training.maml.{key} must be one of {', '.join(allowed)}, got {getattr(maml, key)!r}"
            )
    if not 0.0 <= maml.hybrid_ratio <= 1.0:
        raise ConfigError(f"training.maml.hybrid_ratio must be between 0 and 1, got {maml.hybrid_ratio}")
    at_least = {
        "episode_sequences": 1,
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
