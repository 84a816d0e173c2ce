"""Metrics on learning-dynamics states as training goes, checkpoint after checkpoint."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from .capture import load_states
from .components import ModelShape, component_data_types
from .metrics import MetricSpec, compute_metrics, parse_metric_specs

logger = logging.getLogger(__name__)

States = dict[str, dict[str, torch.Tensor]]


def result_key(spec: MetricSpec) -> str:
    """`{result_name}_{data_split}`: the stem of pico-analyze's per-step output file."""
    return spec.output_filename.removesuffix(".json")


def check_metrics_capturable(
    metric_configs: Sequence[Mapping[str, Any]],
    layer_suffixes: Sequence[str],
    n_layers: int,
    splits: Sequence[str],
) -> list[MetricSpec]:
    """Parse in-training metric specs and check that the run captures what they read: their split, layers
    below `n_layers`, and modules whose names contain one of `layer_suffixes`. Errors name the metric."""
    try:
        specs = parse_metric_specs(metric_configs)
    except ValueError as error:
        raise ValueError(f"metrics: {error}") from error
    for index, spec in enumerate(specs):
        where = f"metrics[{index}] ({spec.metric_name})"
        if spec.data_split not in splits:
            raise ValueError(
                f"{where}: data_split {spec.data_split!r} is not captured (captured: {list(splits)})"
            )
        for component in spec.components:
            too_deep = [layer for layer in component.layers if layer >= n_layers]
            if too_deep:
                raise ValueError(f"{where}: layers {too_deep} do not exist in a model of {n_layers} layers")
            suffixes = (
                [component.layer_suffixes]
                if isinstance(component.layer_suffixes, str)
                else list(component.suffix_map.values())
            )
            # Captured modules are those whose name contains a configured suffix (pico-train's rule).
            missing = [s for s in suffixes if not any(c in f"layers.0.{s}" for c in layer_suffixes)]
            if missing:
                raise ValueError(
                    f"{where}: {missing} is not captured; add it to layer_suffixes (now {list(layer_suffixes)})"
                )
    return specs


class MetricsTracker:
    """Computes metric specs (pico-analyze's format) on each checkpoint's states.

    Comparative metrics (CKA, PWCCA) compare with `target_checkpoint` when a spec sets it (a step reached
    earlier in the run), otherwise with the previous checkpoint. Only the states such comparisons still need
    are kept in memory: the latest checkpoint's, and a fixed target's once reached."""

    def __init__(self, specs: Sequence[MetricSpec], model_shape: ModelShape) -> None:
        missing_split = [spec.metric_name for spec in specs if spec.data_split is None]
        if missing_split:
            raise ValueError(f"learning-dynamics metrics {missing_split} need a data_split (train or val)")
        self.specs = list(specs)
        self.model_shape = model_shape
        self._kept: dict[tuple[str, int], States] = {}  # (split, step) -> states of the needed data types
        self._previous_step: int | None = None
        self._skipped: set[str] = set()

    @classmethod
    def from_config(cls, metric_configs: Sequence[Mapping[str, Any]], model_config: Any) -> MetricsTracker:
        return cls(parse_metric_specs(metric_configs), ModelShape.from_config(model_config))

    def _needed_types(self, split: str, step: int) -> set[str]:
        """Data types of `split` at `step` that a later comparison will use."""
        return {
            data_type
            for spec in self.specs
            if spec.build().comparative
            and spec.data_split == split
            and spec.target_checkpoint in (None, step)
            for component in spec.components
            for data_type in component_data_types(component)
        }

    def update(self, step: int, directory: Path) -> dict[str, dict[str, float]]:
        """Metrics for the checkpoint at `step` whose states are in `directory` (its learning_dynamics folder)."""
        splits = {spec.data_split for spec in self.specs}
        states = {split: load_states(directory, split) for split in splits}
        results: dict[str, dict[str, float]] = {}
        for spec in self.specs:
            source = states[spec.data_split]
            if not source:
                continue  # e.g. no `train` split at the last checkpoint
            target = None
            if spec.build().comparative:
                target_step = (
                    spec.target_checkpoint if spec.target_checkpoint is not None else self._previous_step
                )
                target = source if target_step == step else self._kept.get((spec.data_split, target_step))
                if target is None:
                    self._note(spec, step, target_step)
                    continue
            results[result_key(spec)] = compute_metrics([spec], source, target, model_shape=self.model_shape)[
                spec.result_name
            ]
        self._keep(step, states)
        return results

    def restore(self, step: int, directory_of: Callable[[int], Path]) -> None:
        """After resuming at checkpoint `step`, reload from disk what an uninterrupted run would hold in memory:
        that checkpoint's states (the previous checkpoint of the next one) and fixed targets already reached.
        `directory_of(step)` is a checkpoint's learning_dynamics folder."""
        for spec in self.specs:
            target = spec.target_checkpoint
            if target is None or target >= step or not spec.build().comparative:
                continue
            states = load_states(directory_of(target), spec.data_split)
            needed = self._needed_types(spec.data_split, target)
            if states:
                kept = self._kept.setdefault((spec.data_split, target), {})
                kept.update({kind: states[kind] for kind in needed if kind in states})
        splits = {spec.data_split for spec in self.specs}
        self._keep(step, {split: load_states(directory_of(step), split) for split in splits})

    def _keep(self, step: int, states: dict[str, States]) -> None:
        fixed = {
            (spec.data_split, spec.target_checkpoint)
            for spec in self.specs
            if spec.target_checkpoint is not None
        }
        self._kept = {key: value for key, value in self._kept.items() if key in fixed}
        for split, split_states in states.items():
            needed = self._needed_types(split, step)
            if needed and split_states:
                self._kept[(split, step)] = {
                    kind: split_states[kind] for kind in needed if kind in split_states
                }
        self._previous_step = step

    def _note(self, spec: MetricSpec, step: int, target_step: int | None) -> None:
        if spec.output_filename in self._skipped:
            return
        self._skipped.add(spec.output_filename)
        if target_step is None:
            reason = "no earlier checkpoint"
        elif target_step > step:
            reason = f"step {target_step} has not been reached"
        else:
            reason = f"no learning-dynamics states were saved at step {target_step}"
        logger.info("Skipping %s at step %d: %s to compare with", result_key(spec), step, reason)

    @staticmethod
    def flatten(results: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
        """Log entries: `learning_dynamics/{metric}_{split}/{component_key}`."""
        return {
            f"learning_dynamics/{name}/{key}": value
            for name, values in results.items()
            for key, value in values.items()
        }
