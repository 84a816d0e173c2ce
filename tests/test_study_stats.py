"""The statistics behind a study's verdicts, against scipy.stats, simulation and hand computation."""

import math

import numpy as np
import pytest
from scipy import stats as scipy_stats

from pico_hf.study import stats

BASELINE = {0: 3.10, 1: 3.40, 2: 2.95, 3: 3.22, 4: 3.05}
VARIANT = {0: 3.00, 1: 3.41, 2: 2.70, 3: 3.05, 4: 2.90, 9: 100.0}  # seed 9 has no baseline: not paired


def test_paired_t_is_scipys_ttest_rel():
    test = stats.paired_t(VARIANT, BASELINE, confidence=0.9)
    seeds = range(5)
    reference = scipy_stats.ttest_rel([VARIANT[s] for s in seeds], [BASELINE[s] for s in seeds])
    interval = reference.confidence_interval(0.9)
    differences = [VARIANT[s] - BASELINE[s] for s in seeds]
    assert test.n == 5
    assert test.mean == pytest.approx(np.mean(differences), rel=1e-12)
    assert test.sd == pytest.approx(np.std(differences, ddof=1), rel=1e-12)
    assert test.p == pytest.approx(reference.pvalue, rel=1e-10)
    assert (test.low, test.high) == pytest.approx((interval.low, interval.high), rel=1e-10)
    # Below two seeds there is no interval and no p; identical shifts are certain.
    one = stats.paired_t({0: 2.0}, {0: 1.5})
    assert one.n == 1 and one.mean == 0.5 and math.isnan(one.p) and math.isnan(one.low)
    assert stats.paired_t({1: 2.0}, {0: 1.5}) is None
    assert stats.paired_t({0: 2.0, 1: 3.0}, {0: 1.0, 1: 2.0}).p == 0.0
    assert stats.paired_t({0: 1.0, 1: 2.0}, {0: 1.0, 1: 2.0}).p == 1.0


def test_holm_by_hand():
    # Sorted: 0.01 (x4 = 0.04), 0.02 (x3 = 0.06), 0.03 (x2 = 0.06), 0.5 (x1 = 0.5).
    assert stats.holm([0.03, 0.01, 0.5, 0.02]) == pytest.approx([0.06, 0.04, 0.5, 0.06])
    # Monotone: a later p never gets a smaller adjustment; capped at 1; nan is outside the family.
    assert stats.holm([0.04, 0.01, math.nan]) == pytest.approx([0.04, 0.02, math.nan], nan_ok=True)
    assert stats.holm([0.6, 0.7]) == [1.0, 1.0]


def test_benjamini_hochberg_is_scipys():
    p = [0.001, 0.008, 0.039, 0.041, 0.042, 0.06, 0.074, 0.205, 0.212, 0.216]
    assert stats.benjamini_hochberg(p) == pytest.approx(list(scipy_stats.false_discovery_control(p)))
    assert stats.benjamini_hochberg([0.04, math.nan, 0.01]) == pytest.approx(
        [0.04, math.nan, 0.02], nan_ok=True
    )


def test_power_matches_a_simulated_paired_t_test():
    """At the minimum detectable difference, a simulated paired t-test over n seeds rejects 80% of the time."""
    sd, n = 0.3, 5
    mdd = stats.minimum_detectable_difference(sd, n)
    assert stats.paired_power(mdd, sd, n) == pytest.approx(0.8, abs=1e-9)
    rng = np.random.default_rng(0)
    differences = rng.normal(mdd, sd, size=(200_000, n))
    t = differences.mean(1) / (differences.std(1, ddof=1) / math.sqrt(n))
    rejected = np.abs(t) > scipy_stats.t.ppf(0.975, n - 1)
    assert rejected.mean() == pytest.approx(0.8, abs=0.005)
    # Twice the spread needs twice the difference; more seeds detect less.
    assert stats.minimum_detectable_difference(2 * sd, n) == pytest.approx(2 * mdd)
    assert stats.minimum_detectable_difference(sd, 10) < mdd
    assert math.isnan(stats.minimum_detectable_difference(sd, 1))


def test_seeds_needed_is_the_first_count_with_80_percent_power():
    needed = stats.seeds_needed(0.2, 0.3)
    assert stats.paired_power(0.2, 0.3, needed) >= 0.8 > stats.paired_power(0.2, 0.3, needed - 1)
    assert needed == 20  # (z_.975 + z_.8)^2 (0.3/0.2)^2 = 17.7, plus the t distribution's heavier tails
    assert stats.seeds_needed(0.0, 0.3) is None
    assert stats.seeds_needed(1e-6, 0.3) is None  # more than 1000 seeds


@pytest.mark.parametrize(
    ("metric", "mean", "p_holm", "n", "expected"),
    [
        ("eval_heldout_loss", 0.1, 0.01, 3, "worse"),
        ("eval_heldout_loss", -0.1, 0.01, 3, "better"),
        ("eval_pico_arc_easy/acc", 0.1, 0.01, 3, "better"),
        ("cka_val/layers.0", 0.1, 0.01, 3, "differs"),
        ("eval_heldout_loss", 0.1, 0.2, 3, "no detectable difference"),
        ("eval_heldout_loss", 0.1, 0.01, 2, "too few seeds"),
    ],
)
def test_verdicts(metric, mean, p_holm, n, expected):
    test = stats.PairedTest(mean, 0.01, n, mean - 0.01, mean + 0.01, p_holm)
    assert stats.verdict(test, p_holm, metric) == expected


def test_steps_to_target_interpolates_between_measured_steps():
    curve = {0: 10.0, 10: 6.0, 20: 4.0, 30: 3.0}
    assert stats.steps_to_target(curve, 5.0) == 15.0  # halfway between 6 (step 10) and 4 (step 20)
    assert stats.steps_to_target(curve, 3.0) == 30.0
    assert stats.steps_to_target(curve, 12.0) == 0.0
    assert stats.steps_to_target(curve, 2.0) is None
    assert stats.interpolate(curve, 25) == 3.5 and math.isnan(stats.interpolate(curve, 31))
    mean, low, high = stats.mean_interval([1.2, 1.5, 1.8])
    reference = scipy_stats.t.interval(0.95, 2, loc=1.5, scale=scipy_stats.sem([1.2, 1.5, 1.8]))
    assert mean == pytest.approx(1.5) and (low, high) == pytest.approx(reference)


def test_unequal_budgets_are_compared_at_equal_tokens():
    """With allow_unequal_budget, a variant with twice the batch is compared where both have seen the same
    tokens (the baseline's last step, the variant's step halfway), each curve interpolated there."""
    from types import SimpleNamespace

    from pico_hf.study.report import Quantity
    from pico_hf.study.verdicts import compare_at_end

    seeds = (0, 1, 2)
    baseline = {s: {step: 10 - 0.5 * step + 0.1 * s for step in range(0, 11, 2)} for s in seeds}
    double = {s: {step: 10 - 0.6 * step + 0.1 * s + 0.01 * s * s for step in range(0, 11, 2)} for s in seeds}
    quantity = Quantity(
        "eval/heldout_loss", "heldout_loss", "evaluation", {"base": baseline, "big": double}, [10]
    )
    runs = [
        SimpleNamespace(spec=SimpleNamespace(variant=v, seed=s), tokens_per_step=t)
        for v, t in (("base", 100), ("big", 200))
        for s in seeds
    ]
    study = SimpleNamespace(
        primary=("eval_heldout_loss",),
        baseline="base",
        variants={"base": (), "big": ()},
        contrasts=(),
        allow_unequal_budget=True,
    )
    (verdict,), missing = compare_at_end(study, [quantity], runs)
    assert missing == [] and verdict.step is None and verdict.tokens == 1000
    # Step 5 of the variant lies between its measured steps 4 and 6: linear interpolation.
    variant_values = [10 - 0.6 * 5 + 0.1 * s + 0.01 * s * s for s in seeds]
    base_values = [10 - 0.5 * 10 + 0.1 * s for s in seeds]
    reference = scipy_stats.ttest_rel(variant_values, base_values)
    assert verdict.variant_mean == pytest.approx(np.mean(variant_values))
    assert verdict.baseline_mean == pytest.approx(np.mean(base_values))
    assert verdict.p == pytest.approx(reference.pvalue) and verdict.verdict == "worse"
    # The plots' x axis: tokens trained on.
    from pico_hf.study.report import in_tokens

    (tokens,) = in_tokens([quantity], runs)
    assert sorted(tokens.series["big"][1]) == [0, 400, 800, 1200, 1600, 2000]
    assert tokens.series["base"][1][1000] == baseline[1][10]
