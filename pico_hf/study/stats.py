"""The statistics of a study's verdicts: paired t-tests, multiplicity corrections, power and steps-to-target.

Everything is over seeds, paired by seed (same seed: same initial weights and data order for every variant):
- `paired_t`: the mean per-seed difference, its Student-t interval and the two-sided p-value of the paired t
  test (`scipy.stats.ttest_rel`);
- `holm`: Holm's step-down adjustment (family-wise error), for the verdicts over every variant x primary metric;
- `benjamini_hochberg`: q-values (false discovery rate), for the exploratory intervals;
- `minimum_detectable_difference` and `seeds_needed`: two-sided paired t-test power from the noncentral t;
- `steps_to_target`: the first step at which a curve reaches a value, interpolated linearly between points.
"""

from __future__ import annotations

import itertools
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

ALPHA = 0.05
POWER = 0.8
MIN_SEEDS = 3  # fewer: no verdict (a 2-seed t interval has 1 degree of freedom)
MAX_SEEDS = 1000  # `seeds_needed` gives up above this

BETTER, WORSE, DIFFERS, NO_DIFFERENCE, TOO_FEW = (
    "better",
    "worse",
    "differs",
    "no detectable difference",
    "too few seeds",
)


@dataclass(frozen=True)
class PairedTest:
    mean: float  # mean of the per-seed differences (variant - baseline)
    sd: float  # their sample standard deviation (nan for one seed)
    n: int
    low: float  # Student-t interval of the mean difference (nan below 2 seeds)
    high: float
    p: float  # two-sided paired t-test p-value (nan below 2 seeds)


def paired_t(
    variant: Mapping[int, float], baseline: Mapping[int, float], confidence: float = 0.95
) -> PairedTest | None:
    """variant - baseline over the seeds both have; None when they share none."""
    from scipy.stats import t

    seeds = sorted(set(variant) & set(baseline))
    if not seeds:
        return None
    differences = [variant[s] - baseline[s] for s in seeds]
    n = len(differences)
    mean = math.fsum(differences) / n
    if n < 2:
        return PairedTest(mean, math.nan, n, math.nan, math.nan, math.nan)
    sd = statistics.stdev(differences)
    if sd == 0:  # every seed moved by exactly the same amount: certain, or no difference at all
        return PairedTest(mean, 0.0, n, mean, mean, 1.0 if mean == 0 else 0.0)
    se = sd / math.sqrt(n)
    half = float(t.ppf((1 + confidence) / 2, n - 1)) * se
    p = float(2 * t.sf(abs(mean) / se, n - 1))
    return PairedTest(mean, sd, n, mean - half, mean + half, p)


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm-adjusted p-values in the input order; nan stays nan and is not counted in the family."""
    present = [i for i, p in enumerate(p_values) if not math.isnan(p)]
    order = sorted(present, key=lambda i: p_values[i])
    m = len(order)
    adjusted = [math.nan] * len(p_values)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


def benjamini_hochberg(p_values: Sequence[float]) -> list[float]:
    """Benjamini-Hochberg q-values in the input order; nan stays nan and is not counted."""
    present = [i for i, p in enumerate(p_values) if not math.isnan(p)]
    order = sorted(present, key=lambda i: p_values[i], reverse=True)
    m = len(order)
    adjusted = [math.nan] * len(p_values)
    running = 1.0
    for position, i in enumerate(order):
        rank = m - position  # 1-based rank in ascending order
        running = min(running, m * p_values[i] / rank)
        adjusted[i] = min(1.0, running)
    return adjusted


def paired_power(difference: float, sd: float, n: int, alpha: float = ALPHA) -> float:
    """Power of the two-sided paired t-test at level alpha to detect `difference` over n seeds, paired
    standard deviation sd: P(|T| > t_crit) with T noncentral t, n - 1 degrees of freedom."""
    from scipy.stats import nct, t

    if n < 2 or not sd > 0:
        return math.nan
    critical = float(t.ppf(1 - alpha / 2, n - 1))
    noncentrality = abs(difference) * math.sqrt(n) / sd
    upper = float(nct.sf(critical, n - 1, noncentrality))
    lower = float(nct.cdf(-critical, n - 1, noncentrality))  # the wrong-sign tail: nan where it underflows
    return upper + (0.0 if math.isnan(lower) else lower)


def minimum_detectable_difference(sd: float, n: int, power: float = POWER, alpha: float = ALPHA) -> float:
    """The smallest |difference| the paired t-test over n seeds detects with `power`, given the paired sd."""
    from scipy.optimize import brentq

    if n < 2 or not sd > 0:
        return math.nan
    high = sd
    while paired_power(high, sd, n, alpha) < power:
        high *= 2
    return float(brentq(lambda d: paired_power(d, sd, n, alpha) - power, 0.0, high, xtol=1e-12 * sd))


def seeds_needed(
    difference: float, sd: float, power: float = POWER, alpha: float = ALPHA, limit: int = MAX_SEEDS
) -> int | None:
    """The fewest seeds (at least 2) whose paired t-test detects `difference` with `power`; None above
    `limit` or when nothing can be said (no spread, no difference)."""
    if not sd > 0 or difference == 0 or math.isnan(difference):
        return None
    for n in range(2, limit + 1):
        if paired_power(difference, sd, n, alpha) >= power:
            return n
    return None


def direction(metric: str) -> int:
    """-1: lower is better (losses, perplexities); +1: higher is better (accuracies); 0: no known direction."""
    name = metric.lower()
    if any(word in name for word in ("loss", "perplexity", "ppl", "nll", "bpb", "bits_per")):
        return -1
    if any(word in name for word in ("acc", "exact_match", "f1", "mcc")):
        return 1
    return 0


def verdict(test: PairedTest | None, p_holm: float, metric: str, alpha: float = ALPHA) -> str:
    if test is None or test.n < MIN_SEEDS:
        return TOO_FEW
    if not p_holm < alpha:
        return NO_DIFFERENCE
    sign = direction(metric)
    if sign == 0:
        return DIFFERS
    return BETTER if test.mean * sign > 0 else WORSE


def interpolate(curve: Mapping[float, float], x: float) -> float:
    """The curve's value at x, linear between its points; nan outside them."""
    xs = sorted(curve)
    if not xs or x < xs[0] or x > xs[-1]:
        return math.nan
    for left, right in itertools.pairwise(xs):
        if left <= x <= right:
            if right == left:
                return curve[left]
            fraction = (x - left) / (right - left)
            return curve[left] + fraction * (curve[right] - curve[left])
    return curve[xs[-1]]


def steps_to_target(curve: Mapping[float, float], target: float) -> float | None:
    """The first x at which a falling curve reaches `target` (linear between points); None if never."""
    xs = sorted(curve)
    if not xs:
        return None
    if curve[xs[0]] <= target:
        return float(xs[0])
    for left, right in itertools.pairwise(xs):
        if curve[right] <= target:
            fraction = (curve[left] - target) / (curve[left] - curve[right])
            return left + fraction * (right - left)
    return None


def mean_interval(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """Mean and Student-t interval of values (nan interval for fewer than 2)."""
    from scipy.stats import t

    n = len(values)
    if n == 0:
        return math.nan, math.nan, math.nan
    mean = math.fsum(values) / n
    if n < 2:
        return mean, math.nan, math.nan
    half = float(t.ppf((1 + confidence) / 2, n - 1)) * statistics.stdev(values) / math.sqrt(n)
    return mean, mean - half, mean + half


__all__ = [
    "ALPHA",
    "BETTER",
    "DIFFERS",
    "MIN_SEEDS",
    "NO_DIFFERENCE",
    "TOO_FEW",
    "WORSE",
    "PairedTest",
    "benjamini_hochberg",
    "direction",
    "holm",
    "interpolate",
    "mean_interval",
    "minimum_detectable_difference",
    "paired_power",
    "paired_t",
    "seeds_needed",
    "steps_to_target",
    "verdict",
]
