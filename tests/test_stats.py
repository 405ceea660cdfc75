import math

import pytest

from creditrl.stats import (
    detectable_difference,
    mean_ci,
    paired_difference,
    seeds_needed,
    t_quantile,
    verdict,
)

scipy_stats = pytest.importorskip("scipy.stats")


@pytest.mark.parametrize("p", [0.975, 0.80])
def test_t_quantiles_match_scipy_in_and_beyond_the_table(p):
    for df in [*range(1, 31), 31, 40, 60, 120, 1000]:
        assert t_quantile(df, p) == pytest.approx(scipy_stats.t.ppf(p, df), abs=1.5e-4), df


def test_mean_ci_by_hand_and_against_scipy():
    # mean 0.6, sd 0.1, se 0.1/√3 = 0.057735, half-width 4.3027 · 0.057735 = 0.24842
    mean, half = mean_ci([0.5, 0.6, 0.7])
    assert mean == pytest.approx(0.6) and half == pytest.approx(0.24842, abs=1e-4)
    values = [0.31, 0.42, 0.35, 0.5, 0.28]
    low, high = scipy_stats.t.interval(0.95, len(values) - 1, loc=sum(values) / 5, scale=scipy_stats.sem(values))
    assert mean_ci(values)[1] == pytest.approx((high - low) / 2, rel=1e-4)
    assert math.isnan(mean_ci([0.3])[1])


def test_paired_difference_by_hand_and_against_scipys_paired_t_test():
    # differences 0.1, 0.2, 0.3 (seed 3 has no baseline run): mean 0.2, sd 0.1, half-width 0.24842
    method = {0: 0.5, 1: 0.6, 2: 0.8, 3: 0.9}
    base = {0: 0.4, 1: 0.4, 2: 0.5}
    d = paired_difference(method, base)
    assert d["seeds"] == [0, 1, 2] and d["diffs"] == pytest.approx([0.1, 0.2, 0.3])
    assert d["mean"] == pytest.approx(0.2) and d["sd"] == pytest.approx(0.1)
    assert d["ci95"] == pytest.approx(0.24842, abs=1e-4) and d["verdict"] == "not distinguishable"
    a, b = [0.52, 0.61, 0.58, 0.66, 0.55], [0.45, 0.50, 0.52, 0.57, 0.49]
    ci = scipy_stats.ttest_rel(a, b).confidence_interval(0.95)
    d = paired_difference(dict(enumerate(a)), dict(enumerate(b)))
    assert d["mean"] - d["ci95"] == pytest.approx(ci.low, rel=1e-4)
    assert d["mean"] + d["ci95"] == pytest.approx(ci.high, rel=1e-4)
    assert d["verdict"] == "better"  # every difference is positive and the interval (0.041, 0.119) excludes 0
    assert paired_difference({0: 0.1}, {1: 0.2})["verdict"] is None


def test_verdict_reads_the_interval():
    assert verdict(0.05, 0.04) == "better" and verdict(-0.05, 0.04) == "worse"
    assert verdict(0.05, 0.06) == "not distinguishable" and verdict(0.05, math.nan) is None


def test_seeds_needed_by_hand():
    # σ_d = δ: n = 9 gives (2.3060 + 0.8889)² = 10.21 > 9; n = 10 gives (2.2622 + 0.8834)² = 9.895 ≤ 10
    assert seeds_needed(0.1, 0.1) == 10
    assert seeds_needed(0.0, 0.05) == 2
    assert seeds_needed(1.0, 1e-3) is None  # more than MAX_SEEDS
    with pytest.raises(ValueError, match="positive"):
        seeds_needed(0.1, 0.0)


def test_seeds_needed_solves_the_stated_inequality_with_scipys_quantiles_and_has_about_80_percent_power():
    for sd, delta in [(0.05, 0.03), (0.08, 0.05), (0.12, 0.04), (0.03, 0.05)]:
        def enough(n):
            return n >= ((scipy_stats.t.ppf(0.975, n - 1) + scipy_stats.t.ppf(0.8, n - 1)) * sd / delta) ** 2
        expected = next(n for n in range(2, 10_000) if enough(n))
        n = seeds_needed(sd, delta)
        assert n == expected
        # the exact power of the paired t-test at n (noncentral t) is close to the 80% aimed at
        nc = delta / (sd / math.sqrt(n))
        crit = scipy_stats.t.ppf(0.975, n - 1)
        power = 1 - scipy_stats.nct.cdf(crit, n - 1, nc) + scipy_stats.nct.cdf(-crit, n - 1, nc)
        assert 0.75 < power < 0.9, (sd, delta, n, power)


def test_detectable_difference_inverts_seeds_needed():
    # 10 seeds, σ_d = 0.1: (2.2622 + 0.8834) · 0.1 / √10 = 0.09947
    assert detectable_difference(0.1, 10) == pytest.approx(0.09947, abs=1e-4)
    assert seeds_needed(0.1, detectable_difference(0.1, 10) * 1.001) == 10  # just above the boundary
    assert seeds_needed(0.1, detectable_difference(0.1, 10) * 0.98) == 11
    with pytest.raises(ValueError, match="2 seeds"):
        detectable_difference(0.1, 1)
