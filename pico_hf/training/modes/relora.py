"""ReLoRA's section, `training.relora`, and its checks; the mode's hooks are in `pico_hf.training.relora`."""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass, field
from typing import Any

from .base import TrainingMode
from .registry import register_mode

DEFAULT_RELORA_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "w_0", "w_1", "w_2"]
DEEPSPEED_UNSUPPORTED = (
    "training.relora cannot run under DeepSpeed: ZeRO keeps the optimizer state in flat partitions, not keyed "
    "by parameter, so the LoRA moments could not be pruned at a reset (it would silently do nothing). Launch "
    "with recipes/accelerate/fsdp.yaml or ddp.yaml"
)
# The reference implementations' defaults: random pruning keeps 0.1% of the moments, magnitude keeps 10%.
DEFAULT_RESET_RATIO = {"random": 0.999, "magnitude": 0.9}


@dataclass
class ReLoRAConfig:
    """`training.relora`: off unless `enabled`. Keys follow the Pico port (relora-pico) where it has them."""

    enabled: bool = False
    # Module names (or name suffixes) that get LoRA adapters: by default the attention and SwiGLU projections.
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_RELORA_TARGET_MODULES))
    r: int = 16
    lora_alpha: float = 32
    lora_dropout: float = 0.1
    # Merge-and-reinit cadence in optimizer steps, counted from the end of the warm start.
    reset_frequency: int = 1000
    # How the LoRA parameters' Adam moments are pruned at each reset: `random` or `magnitude`.
    optimizer_reset: str = "random"
    # Fraction of each moment tensor zeroed; null: 0.999 (random) or 0.9 (magnitude).
    optimizer_reset_ratio: float | None = None
    restart_warmup_steps: int = 100
    # The cosine decays to lr * min_lr_ratio at max_steps.
    min_lr_ratio: float = 0.1
    # Full-rank warm start: N full-rank steps in this run before LoRA training starts ...
    warm_start_steps: int = 0
    # ... or a run's checkpoint (`checkpoints/step_N`) whose weights, not its optimizer, start the run, which
    # continues from its step and data position (training.max_steps counts its steps too).
    warm_start_checkpoint: str | None = None

    @property
    def reset_ratio(self) -> float:
        if self.optimizer_reset_ratio is not None:
            return self.optimizer_reset_ratio
        return DEFAULT_RESET_RATIO.get(self.optimizer_reset, 0.0)


def validate_relora(relora: ReLoRAConfig, max_steps: int, lr_warmup_steps: int) -> list[str]:
    """Problems with a `training.relora` block, each naming its key (empty when it is off or sound)."""
    if not relora.enabled:
        return []
    key = "training.relora"
    if importlib.util.find_spec("peft") is None:
        return [f'{key}.enabled needs peft, which is not installed: pip install "pico-hf[relora]"']
    problems = []
    if relora.r < 1:
        problems.append(f"{key}.r must be at least 1, got {relora.r}")
    if relora.lora_alpha <= 0:
        problems.append(f"{key}.lora_alpha must be positive, got {relora.lora_alpha}")
    if not 0 <= relora.lora_dropout < 1:
        problems.append(f"{key}.lora_dropout must be in [0, 1), got {relora.lora_dropout}")
    if not relora.target_modules:
        problems.append(f"{key}.target_modules must name at least one module")
    if relora.optimizer_reset not in DEFAULT_RESET_RATIO:
        problems.append(
            f"{key}.optimizer_reset must be one of {sorted(DEFAULT_RESET_RATIO)}, got '{relora.optimizer_reset}'"
        )
    if relora.optimizer_reset_ratio is not None and not 0 <= relora.optimizer_reset_ratio < 1:
        problems.append(f"{key}.optimizer_reset_ratio must be in [0, 1), got {relora.optimizer_reset_ratio}")
    problems += check_jagged_cosine(
        key,
        min_lr_ratio=relora.min_lr_ratio,
        reset_frequency=relora.reset_frequency,
        restart_warmup_steps=relora.restart_warmup_steps,
        warm_start_steps=relora.warm_start_steps,
        max_steps=max_steps,
        lr_warmup_steps=lr_warmup_steps,
    )
    if relora.warm_start_steps and relora.warm_start_checkpoint:
        problems.append(f"{key}: set warm_start_steps or warm_start_checkpoint, not both")
    return problems


def check_cosine(key: str, min_lr_ratio: float) -> list[str]:
    return [] if 0 < min_lr_ratio <= 1 else [f"{key}.min_lr_ratio must be in (0, 1], got {min_lr_ratio}"]


def check_jagged_cosine(
    key: str,
    *,
    min_lr_ratio: float,
    reset_frequency: int,
    restart_warmup_steps: int,
    warm_start_steps: int,
    max_steps: int,
    lr_warmup_steps: int,
) -> list[str]:
    """Problems with the jagged cosine's keys under `key` (`training.relora` or `training.optimization`)."""
    problems = []
    if restart_warmup_steps < 0:
        problems.append(f"{key}.restart_warmup_steps must not be negative, got {restart_warmup_steps}")
    if reset_frequency <= restart_warmup_steps:
        problems.append(
            f"{key}.reset_frequency ({reset_frequency}) must be greater than "
            f"{key}.restart_warmup_steps ({restart_warmup_steps})"
        )
    problems += check_cosine(key, min_lr_ratio)
    if warm_start_steps < 0:
        problems.append(f"{key}.warm_start_steps must not be negative, got {warm_start_steps}")
    elif warm_start_steps >= max_steps:  # e.g. a demo shortened with training.max_steps alone
        problems.append(
            f"{key}.warm_start_steps ({warm_start_steps}) must end before training.max_steps ({max_steps}): "
            f"set {key}.warm_start_steps={max(0, max_steps - 1)} or lower, or raise training.max_steps"
        )
    if lr_warmup_steps > warm_start_steps + reset_frequency:
        problems.append(
            f"training.optimization.lr_warmup_steps ({lr_warmup_steps}) must end by the first reset, at step "
            f"{warm_start_steps + reset_frequency} ({key}.warm_start_steps + reset_frequency)"
        )
    return problems


@register_mode
class ReLoRA(TrainingMode):
    key = "relora"
    config_class = ReLoRAConfig
    implementation = "pico_hf.training.relora:ReLoRAMode"

    @classmethod
    def check_config(cls, section: ReLoRAConfig, config: Any) -> list[str]:
        optimization = config.training.optimization
        problems = validate_relora(section, config.training.max_steps, optimization.lr_warmup_steps)
        if section.enabled and os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() in ("1", "true", "yes"):
            problems.append(DEEPSPEED_UNSUPPORTED)  # an `accelerate launch` with a DeepSpeed config
        if optimization.lr_scheduler != "linear_with_warmup":
            # One schedule per run: ReLoRA's jagged cosine, keyed in its own section.
            problems.append(
                f"training.optimization.lr_scheduler '{optimization.lr_scheduler}' cannot be combined with "
                "training.relora, which follows its own jagged cosine (training.relora.reset_frequency, "
                "restart_warmup_steps, min_lr_ratio): leave lr_scheduler at 'linear_with_warmup'"
            )
        return problems
