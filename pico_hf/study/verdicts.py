"""What a study concludes: a verdict per variant x primary metric, steps-to-target, and the exploratory rest.

A verdict compares a variant with the baseline (or, for a pair in the study's `contrasts`, with another
variant: ReLoRA against full rank on ReLoRA's schedule) on one primary metric at the end of training (the last
step, or with `allow_unequal_budget` the most tokens both trained on, each seed's curve interpolated there): the
paired t-test over seeds, Holm-adjusted over every comparison x primary metric of the study. `better`/`worse` where
the metric's direction is known (losses and perplexities lower, accuracies higher) and the adjusted p is below
0.05, `differs` where it has none, `no detectable difference` otherwise, `too few seeds` below 3 seeds.
Every other comparison (other steps, every other quantity) is exploratory: its q-value (Benjamini-Hochberg over
all of them) stands beside its interval.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from . import stats

if TYPE_CHECKING:
    from .config import StudyConfig
    from .report import Quantity, RunData

Curve = dict[float, float]  # x (step or tokens) -> value


@dataclass
class Verdict:
    variant: str
    reference: str  # the baseline, or a contrast's reference variant
    metric: str
    step: int | None  # the step compared (None when compared at equal tokens)
    tokens: int | None  # the tokens every compared run had trained on there
    baseline_mean: float
    variant_mean: float
    difference: float
    relative: float  # difference / reference mean (`baseline_mean`: the reference's)
    ci: list[float]
    p: float
    p_holm: float
    verdict: str
    seeds: int
    sd: float  # paired standard deviation
    minimum_detectable: float  # smallest |difference| detected with 80% power at this sd and seed count
    seeds_needed: int | None  # seeds that would detect the observed difference with 80% power

    def summary(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class StepsToTarget:
    variant: str
    metric: str
    target: float  # mean over seeds of the baseline's final value
    ratio: float  # mean over the seeds that reached it of baseline steps / variant steps
    ci: list[float]
    reached_seeds: int
    seeds: int
    variant_steps: dict[int, float | None]  # per seed; None: not reached
    baseline_steps: dict[int, float | None]
    tokens_per_step: int

    def summary(self) -> dict[str, Any]:
        out = asdict(self)
        out["variant_steps"] = {str(k): v for k, v in self.variant_steps.items()}
        out["baseline_steps"] = {str(k): v for k, v in self.baseline_steps.items()}
        return out


def find_quantity(name: str, quantities: Sequence[Quantity]) -> Quantity | None:
    """A primary name as logged (`eval_heldout_loss`, `eval_paloma`, `loss`) or as the report names it."""
    wanted = {name}
    if name.startswith("eval_"):
        wanted.add("eval/" + name[len("eval_") :])
    if name in ("loss", "train_loss"):
        wanted.add("train/loss")
    return next((q for q in quantities if q.name in wanted), None)


def _tokens_per_step(runs: Sequence[RunData]) -> dict[tuple[str, int], int]:
    return {(r.spec.variant, r.spec.seed): r.tokens_per_step for r in runs}


def curves(quantity: Quantity, variant: str, runs: Sequence[RunData], by_tokens: bool) -> dict[int, Curve]:
    """seed -> {x: value}, x the step or (by_tokens) the tokens trained on."""
    per_step = _tokens_per_step(runs)
    out = {}
    for seed, series in quantity.series.get(variant, {}).items():
        scale = per_step[(variant, seed)] if by_tokens else 1
        out[seed] = {float(step * scale): value for step, value in series.items()}
    return out


def compare_at_end(
    study: StudyConfig, quantities: Sequence[Quantity], runs: Sequence[RunData]
) -> tuple[list[Verdict], list[str]]:
    """A verdict per comparison (each variant against the baseline, then the contrasts) x primary metric; and
    the primary metrics no run logged."""
    missing, rows = [], []
    by_tokens = study.allow_unequal_budget
    comparisons = [(v, study.baseline) for v in study.variants if v != study.baseline]
    comparisons += list(study.contrasts)
    for metric in study.primary:
        quantity = find_quantity(metric, quantities)
        if quantity is None or study.baseline not in quantity.series:
            missing.append(metric)
            continue
        for variant, reference in comparisons:
            if variant not in quantity.series or reference not in quantity.series:
                continue
            base = curves(quantity, reference, runs, by_tokens)
            mine = curves(quantity, variant, runs, by_tokens)
            end = min(max(c) for c in [*base.values(), *mine.values()])  # the last x every run has
            base_values = {seed: stats.interpolate(c, end) for seed, c in base.items()}
            mine_values = {seed: stats.interpolate(c, end) for seed, c in mine.items()}
            test = stats.paired_t(mine_values, base_values)
            if test is None:
                continue
            seeds = sorted(set(base_values) & set(mine_values))
            base_mean = math.fsum(base_values[s] for s in seeds) / len(seeds)
            rows.append(
                (
                    test,
                    Verdict(
                        variant=variant,
                        reference=reference,
                        metric=metric,
                        step=None if by_tokens else int(end),
                        tokens=int(end) if by_tokens else None,
                        baseline_mean=base_mean,
                        variant_mean=math.fsum(mine_values[s] for s in seeds) / len(seeds),
                        difference=test.mean,
                        relative=test.mean / base_mean if base_mean else math.nan,
                        ci=[test.low, test.high],
                        p=test.p,
                        p_holm=math.nan,
                        verdict="",
                        seeds=test.n,
                        sd=test.sd,
                        minimum_detectable=stats.minimum_detectable_difference(test.sd, test.n),
                        seeds_needed=stats.seeds_needed(test.mean, test.sd),
                    ),
                )
            )
    adjusted = stats.holm([test.p for test, _ in rows])
    for (test, row), p_holm in zip(rows, adjusted, strict=True):
        row.p_holm = p_holm
        row.verdict = stats.verdict(test, p_holm, row.metric)
    return [row for _, row in rows], missing


def steps_to_target(
    study: StudyConfig, quantities: Sequence[Quantity], runs: Sequence[RunData]
) -> list[StepsToTarget]:
    """For each loss-like primary metric and variant: per seed, the first step at which the variant's curve
    reaches the baseline's final value, and the speed-up (baseline steps / variant steps) over seeds."""
    out = []
    for metric in study.primary:
        quantity = find_quantity(metric, quantities)
        if quantity is None or stats.direction(metric) != -1 or study.baseline not in quantity.series:
            continue
        base = curves(quantity, study.baseline, runs, by_tokens=False)
        for variant in study.variants:
            if variant == study.baseline or variant not in quantity.series:
                continue
            mine = curves(quantity, variant, runs, by_tokens=False)
            seeds = sorted(set(base) & set(mine))
            targets = {seed: base[seed][max(base[seed])] for seed in seeds}
            base_steps = {seed: stats.steps_to_target(base[seed], targets[seed]) for seed in seeds}
            variant_steps = {seed: stats.steps_to_target(mine[seed], targets[seed]) for seed in seeds}
            ratios = [
                base_steps[s] / variant_steps[s]  # type: ignore[operator]
                for s in seeds
                if variant_steps[s] and base_steps[s] is not None
            ]
            mean, low, high = stats.mean_interval(ratios)
            per_step = _tokens_per_step(runs)
            out.append(
                StepsToTarget(
                    variant=variant,
                    metric=metric,
                    target=math.fsum(targets.values()) / len(seeds) if seeds else math.nan,
                    ratio=mean,
                    ci=[low, high],
                    reached_seeds=len(ratios),
                    seeds=len(seeds),
                    variant_steps=variant_steps,
                    baseline_steps=base_steps,
                    tokens_per_step=per_step[(variant, seeds[0])] if seeds else 0,
                )
            )
    return out


def mark_exploratory(
    quantities: Sequence[Quantity], verdicts: Sequence[Verdict], primary_names: Mapping[str, str]
):
    """Benjamini-Hochberg q-values over every comparison that is not a verdict; returns (intervals, excluding
    zero) counted over those with an interval."""
    judged = {(primary_names.get(v.metric), v.variant, v.step) for v in verdicts}
    cells = []
    for quantity in quantities:
        for step, row in quantity.cells.items():
            for variant, cell in row.items():
                if cell.difference is None or (quantity.name, variant, step) in judged:
                    continue
                cells.append(cell)
    q_values = stats.benjamini_hochberg([cell.p for cell in cells])
    for cell, q in zip(cells, q_values, strict=True):
        cell.q = q
    intervals = [c.difference for c in cells if c.difference is not None and c.difference.n >= 2]
    excluding = sum(1 for d in intervals if d.low > 0 or d.high < 0)
    significant = sum(1 for q in q_values if q < stats.ALPHA)
    return len(intervals), excluding, significant


__all__ = [
    "StepsToTarget",
    "Verdict",
    "compare_at_end",
    "find_quantity",
    "mark_exploratory",
    "steps_to_target",
]
