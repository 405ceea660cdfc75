"""Statistics over seeds: t intervals, paired differences against a baseline, and the seeds a difference needs.

Intervals are two-sided 95% Student-t intervals over seeds: x̄ ± t_{0.975, n−1}·s/√n, s the sample
standard deviation (n − 1 in the denominator).  A paired difference pairs the runs of two methods
with the same seed (same prompt order, same evaluation set and sampling seed): d_s = x_s − b_s, and
the interval is the one-sample t interval of the d_s.  The verdict reads the interval: above 0 is
"better", below 0 "worse", straddling 0 "not distinguishable" (fewer than two pairs: no verdict).

Power (paired t-test, two-sided α = 0.05, power 1 − β = 0.8): the seeds needed to detect a true
mean difference δ given the spread σ_d of the paired differences are the smallest n ≥ 2 with
    n ≥ ((t_{0.975, n−1} + t_{0.80, n−1}) · σ_d / δ)²
(the normal approximation with t quantiles in place of z, solved by counting up), and the smallest
difference n seeds detect is δ_n = (t_{0.975, n−1} + t_{0.80, n−1}) · σ_d / √n.
"""

from __future__ import annotations

import math
import statistics

# Student-t quantiles for df = 1..30 (4 decimals); beyond, the Cornish-Fisher expansion below.
T_975 = (12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281,
         2.2010, 2.1788, 2.1604, 2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860,
         2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555, 2.0518, 2.0484, 2.0452, 2.0423)
T_80 = (1.3764, 1.0607, 0.9785, 0.9410, 0.9195, 0.9057, 0.8960, 0.8889, 0.8834, 0.8791,
        0.8755, 0.8726, 0.8702, 0.8681, 0.8662, 0.8647, 0.8633, 0.8620, 0.8610, 0.8600,
        0.8591, 0.8583, 0.8575, 0.8569, 0.8562, 0.8557, 0.8551, 0.8546, 0.8542, 0.8538)
Z = {0.975: 1.959964, 0.80: 0.841621}
TABLES = {0.975: T_975, 0.80: T_80}
MAX_SEEDS = 10_000  # seeds_needed gives up beyond this


def t_quantile(df: int, p: float = 0.975) -> float:
    """t_{p, df} for p in {0.975, 0.80}: the table for df ≤ 30, beyond it
    z + (z³ + z)/(4·df) + (5z⁵ + 16z³ + 3z)/(96·df²) (error under 1e-4)."""
    if df < 1:
        raise ValueError("the t quantile needs df ≥ 1")
    if p not in TABLES:
        raise ValueError(f"t quantiles are tabulated for p in {sorted(TABLES)}, not {p}")
    if df <= len(TABLES[p]):
        return TABLES[p][df - 1]
    z = Z[p]
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def mean_ci(values: list[float]) -> tuple[float, float]:
    """(mean, half-width of the 95% t interval); the half-width is NaN for fewer than 2 values."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, math.nan
    return mean, t_quantile(len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))


def verdict(mean: float, half: float) -> str | None:
    """'better' when the interval mean ± half lies above 0, 'worse' below, else 'not distinguishable';
    None without an interval (NaN half-width)."""
    if math.isnan(half):
        return None
    if mean - half > 0:
        return "better"
    if mean + half < 0:
        return "worse"
    return "not distinguishable"


def paired_difference(values: dict[int, float], baseline: dict[int, float]) -> dict:
    """Mean paired difference over the seeds both have, its 95% t half-width, the spread σ_d of
    the differences and the verdict.  Keys: seeds; values: a per-run number."""
    seeds = sorted(set(values) & set(baseline))
    if not seeds:
        return {"seeds": [], "mean": None, "ci95": None, "sd": None, "verdict": None}
    diffs = [values[s] - baseline[s] for s in seeds]
    mean, half = mean_ci(diffs)
    sd = statistics.stdev(diffs) if len(diffs) > 1 else None
    return {"seeds": seeds, "diffs": diffs, "mean": mean, "ci95": None if math.isnan(half) else half, "sd": sd,
            "verdict": verdict(mean, half)}


def seeds_needed(sd: float, delta: float) -> int | None:
    """The smallest n ≥ 2 with n ≥ ((t_{0.975,n−1} + t_{0.80,n−1})·sd/δ)²; None beyond MAX_SEEDS."""
    if delta <= 0:
        raise ValueError(f"the difference to detect must be positive, not {delta}")
    for n in range(2, MAX_SEEDS + 1):
        if n >= ((t_quantile(n - 1) + t_quantile(n - 1, 0.80)) * sd / delta) ** 2:
            return n
    return None


def detectable_difference(sd: float, n: int) -> float:
    """δ_n = (t_{0.975,n−1} + t_{0.80,n−1})·sd/√n: the smallest true difference n paired seeds detect
    with 80% power at α = 0.05."""
    if n < 2:
        raise ValueError(f"a paired t-test needs at least 2 seeds, not {n}")
    return (t_quantile(n - 1) + t_quantile(n - 1, 0.80)) * sd / math.sqrt(n)
