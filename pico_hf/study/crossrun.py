"""Cross-run learning dynamics: how far a variant moved the representations away from the baseline's.

For each variant and seed, at every step both runs stored `val` learning-dynamics data, the comparative metrics
of the study's analysis (`cka`, `pwcca`) compare the variant's activations with the baseline's of the same seed
(same initial weights, same data order) on the same `val` data, per layer and component, with the
implementations pico-analyze's metrics use (`pico_hf.learning_dynamics.metrics.compute_metrics`). 1 is the
baseline's representation (up to what the metric ignores: an orthogonal transform and isotropic scaling for
CKA); the further below 1, the further the change moved it.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from ..learning_dynamics.analysis_sources import AnalysisError, LocalRun
from ..learning_dynamics.metrics import compute_metrics
from .config import StudyConfig

COMPARATIVE = ("cka", "pwcca")
SPLIT = "val"


@dataclass(frozen=True)
class CrossRunValue:
    variant: str
    seed: int
    step: int
    metric: str  # the result name, e.g. cka_val
    component: str  # e.g. layers.0.swiglu.w_2.activations
    value: float

    def summary(self) -> dict[str, Any]:
        return asdict(self)


def comparative_specs(study: StudyConfig) -> list[dict[str, Any]]:
    """The study analysis' comparative metrics on `val`, without their checkpoint target (the other run is)."""
    specs = []
    for metric in (study.analysis or {}).get("metrics") or []:
        if metric.get("metric_name") in COMPARATIVE and metric.get("data_split", SPLIT) == SPLIT:
            spec = copy.deepcopy(dict(metric))
            spec.pop("target_checkpoint", None)
            specs.append(spec)
    return specs


def cross_run_dynamics(study: StudyConfig, skip: Sequence[str] = ()) -> tuple[list[CrossRunValue], list[str]]:
    """Every variant x seed x step x component against the baseline; and warnings for pairs not compared.
    `skip`: run names to leave out (failed runs)."""
    specs = comparative_specs(study)
    if not specs:
        return [], []
    baselines = {spec.seed: spec for spec in study.runs if spec.variant == study.baseline}
    values, warnings = [], []
    for spec in study.runs:
        base = baselines.get(spec.seed)
        if spec.variant == study.baseline or base is None or {spec.name, base.name} & set(skip):
            continue
        try:
            mine, theirs = LocalRun(spec.run_dir), LocalRun(base.run_dir)
            steps = sorted(set(mine.available_steps(SPLIT)) & set(theirs.available_steps(SPLIT)))
            shape = mine.model_config()
            for step in steps:
                results = compute_metrics(
                    specs,
                    mine.load(step, SPLIT, ["activations"]),
                    theirs.load(step, SPLIT, ["activations"]),
                    model_shape=shape,
                )
                for metric, by_component in results.items():
                    for component, value in by_component.items():
                        name = f"{metric}_{SPLIT}"  # as the analysis names its results: cka_val
                        values.append(CrossRunValue(spec.variant, spec.seed, step, name, component, value))
        except (AnalysisError, ValueError, KeyError, FileNotFoundError) as error:
            warnings.append(f"{spec.name} vs {base.name}: not compared across runs ({error})")
    return values, warnings


def to_json(values: Sequence[CrossRunValue]) -> str:
    return json.dumps([v.summary() for v in values])


__all__ = ["CrossRunValue", "comparative_specs", "cross_run_dynamics"]
