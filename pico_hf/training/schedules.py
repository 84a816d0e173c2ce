"""Learning-rate multipliers beside the Trainer's own linear schedule: one cosine, and ReLoRA's jagged cosine.

`training.optimization.lr_scheduler` picks one for a full-rank run (`cosine`, `jagged_cosine`); a ReLoRA run
follows the jagged cosine of `training.relora`. The multiplier is a function of the 0-based optimizer step.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from typing import Any


def jagged_cosine(
    step: int,
    *,
    max_steps: int,
    warmup_steps: int,
    reset_frequency: int,
    restart_warmup_steps: int,
    min_lr_ratio: float,
    warm_start_steps: int = 0,
) -> float:
    """The LR multiplier for optimizer step `step` (0-based): linear warmup, one cosine from the warmup's end to
    `min_lr_ratio` at `max_steps`, and after each reset (steps warm_start + k * reset_frequency, k >= 1) a linear
    re-warmup over `restart_warmup_steps` to the cosine's value at the re-warmup's end. The switch from the
    warm start to LoRA is no reset: the cosine's phase carries on."""

    def cosine(at: int) -> float:
        progress = min(max((at - warmup_steps) / max(1, max_steps - warmup_steps), 0.0), 1.0)
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    if step < warmup_steps:
        return step / max(1, warmup_steps)
    since_start = step - warm_start_steps
    if since_start >= reset_frequency:
        into_cycle = since_start % reset_frequency
        if into_cycle < restart_warmup_steps:
            return into_cycle / restart_warmup_steps * cosine(step - into_cycle + restart_warmup_steps)
    return cosine(step)


def optimization_lr_multiplier(
    optimization: Any, max_steps: int, relora: Any = None
) -> Callable[[int], float] | None:
    """The multiplier that `training.optimization` asks for, or None for the Trainer's linear schedule.

    `cosine` is the jagged cosine without resets: a warmup, then one cosine down to `min_lr_ratio`."""
    if optimization.lr_scheduler == "linear_with_warmup":
        return None
    schedule = optimization.jagged_schedule(relora)
    if optimization.lr_scheduler == "cosine":
        schedule.update(reset_frequency=max_steps + 1, restart_warmup_steps=0, warm_start_steps=0)
    return partial(jagged_cosine, max_steps=max_steps, warmup_steps=optimization.lr_warmup_steps, **schedule)
