"""The statistics every table and claim shares, each named where it is shown so a reader knows
which test was run: the mean over seeds with its 95% t-interval, Welch's t-test (unequal
variances) and the paired t-test for a difference, Spearman's rank correlation with a
Fisher-z interval. The formulas are written out (scipy gives only the t distribution), so
they can be checked against textbook examples and ``scipy.stats``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy.stats import norm
from scipy.stats import t as t_dist

LEVEL = 0.95
MEAN_CI = "mean ± half-width of the 95% t-interval over seeds"
WELCH = "Welch's t-test (unequal variances)"
PAIRED = "paired t-test over seeds"
SPEARMAN = "Spearman's rank correlation, 95% Fisher-z interval (SE² = 1.06/(n−3))"
NO_CI = "one seed: CI not available"


@dataclass(frozen=True)
class Estimate:
    """A measured value, its 95% interval (NaN where there is none), the sample size, a
    p-value where a test was run, the method's name and a note (why there is no CI)."""

    value: float
    low: float = math.nan
    high: float = math.nan
    n: int = 0
    p: float = math.nan
    method: str = ""
    note: str = ""

    @property
    def has_ci(self) -> bool:
        return not (math.isnan(self.low) or math.isnan(self.high))

    def scaled(self, factor: float) -> Estimate:
        """The same estimate in other units (fractions -> percent)."""
        return Estimate(self.value * factor, self.low * factor, self.high * factor, self.n,
                        self.p, self.method, self.note)


def _clean(values) -> np.ndarray:
    arr = np.asarray(list(values), dtype=float)
    return arr[np.isfinite(arr)]


def t_quantile(df: float, level: float = LEVEL) -> float:
    return float(t_dist.ppf(0.5 + level / 2, df))


def mean_ci(values, level: float = LEVEL) -> Estimate:
    """Mean and t-interval mean ± t(df=n−1) · s/√n; with one value, no interval."""
    x = _clean(values)
    if len(x) == 0:
        return Estimate(math.nan, n=0, method=MEAN_CI, note="no value")
    mean = float(x.mean())
    if len(x) < 2:
        return Estimate(mean, n=1, method=MEAN_CI, note=NO_CI)
    half = t_quantile(len(x) - 1, level) * float(x.std(ddof=1)) / math.sqrt(len(x))
    return Estimate(mean, mean - half, mean + half, len(x), method=MEAN_CI)


def welch(a, b, level: float = LEVEL) -> Estimate:
    """mean(a) − mean(b) with Welch's t-test: se² = s_a²/n_a + s_b²/n_b, Welch–Satterthwaite
    degrees of freedom, two-sided p-value and the interval of the difference."""
    a, b = _clean(a), _clean(b)
    n = len(a) + len(b)
    if len(a) == 0 or len(b) == 0:
        return Estimate(math.nan, n=n, method=WELCH, note="no value on one side")
    diff = float(a.mean() - b.mean())
    if len(a) < 2 or len(b) < 2:
        return Estimate(diff, n=n, method=WELCH, note=NO_CI + " (Welch's test needs 2 per side)")
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    se = math.sqrt(va + vb)
    if se == 0:   # both sides constant: the difference is exact
        return Estimate(diff, diff, diff, n, 1.0 if diff == 0 else 0.0, WELCH, "no spread")
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    t = diff / se
    half = t_quantile(df, level) * se
    return Estimate(diff, diff - half, diff + half, n, float(2 * t_dist.sf(abs(t), df)), WELCH)


def paired(a, b, level: float = LEVEL) -> Estimate:
    """mean(a − b) over pairs (same seed), t-interval and two-sided p of the paired t-test."""
    d = np.asarray(a, float) - np.asarray(b, float)
    d = d[np.isfinite(d)]
    est = mean_ci(d, level)
    if not est.has_ci:
        return Estimate(est.value, n=est.n, method=PAIRED, note=est.note)
    sd = float(d.std(ddof=1))
    if sd == 0:
        return Estimate(est.value, est.value, est.value, est.n, 1.0 if est.value == 0 else 0.0,
                        PAIRED, "no spread")
    t = est.value / (sd / math.sqrt(len(d)))
    return Estimate(est.value, est.low, est.high, est.n,
                    float(2 * t_dist.sf(abs(t), len(d) - 1)), PAIRED)


def spearman(x, y, level: float = LEVEL) -> Estimate:
    """Spearman's ρ (Pearson's r of average ranks), p from t = ρ√((n−2)/(1−ρ²)) on n−2 df (as
    scipy), and a Fisher-z interval with the Fieller–Hartley–Pearson variance 1.06/(n−3)."""
    frame = pd.DataFrame({"x": np.asarray(x, float), "y": np.asarray(y, float)})
    frame = frame[np.isfinite(frame["x"]) & np.isfinite(frame["y"])]
    n = len(frame)
    if n < 3:
        return Estimate(math.nan, n=n, method=SPEARMAN, note=f"{n} points: need at least 3")
    rx, ry = frame["x"].rank().to_numpy(), frame["y"].rank().to_numpy()
    if rx.std() == 0 or ry.std() == 0:
        return Estimate(math.nan, n=n, method=SPEARMAN, note="one side is constant")
    rho = float(np.corrcoef(rx, ry)[0, 1])
    if abs(rho) >= 1:
        p = 0.0
    else:
        t = rho * math.sqrt((n - 2) / (1 - rho ** 2))
        p = float(2 * t_dist.sf(abs(t), n - 2))
    if n < 4:
        return Estimate(rho, n=n, p=p, method=SPEARMAN, note="3 points: no interval")
    z, se = math.atanh(max(min(rho, 1 - 1e-12), -1 + 1e-12)), math.sqrt(1.06 / (n - 3))
    q = float(norm.ppf(0.5 + level / 2))   # 1.96 at 95%
    return Estimate(rho, math.tanh(z - q * se), math.tanh(z + q * se), n, p, SPEARMAN)


def fmt(est: Estimate, digits: int = 1, unit: str = "") -> str:
    """'80.0 ± 2.8' (half-width of the interval), '61.4 (n=1, no CI)', '–' without a value;
    an asymmetric interval is written '0.52 [0.10, 0.79]'."""
    if math.isnan(est.value):
        return "–"
    v = f"{est.value:.{digits}f}{unit}"
    if not est.has_ci:
        return f"{v} (n={est.n}, no CI)"
    lo, hi = est.value - est.low, est.high - est.value
    if math.isclose(lo, hi, rel_tol=1e-6, abs_tol=10 ** -(digits + 3)):
        return f"{v} ± {hi:.{digits}f}{unit}"
    return f"{v} [{est.low:.{digits}f}, {est.high:.{digits}f}]{unit}"


def fmt_p(p: float) -> str:
    if math.isnan(p):
        return "–"
    return "< 0.001" if p < 0.001 else f"{p:.3f}"


def expected_best_of_draws(values, k: int, replace: bool = False) -> float:
    """E[max of k draws] from ``values`` (every value equally likely): the performance a
    random search of budget k over a grid expects (Sivaprasad et al. 2020, "Optimizer
    benchmarking needs to account for hyperparameter tuning", Sec. 3). With the values sorted
    ascending, v_(1) ≤ … ≤ v_(n): without replacement P(max = v_(i)) = C(i−1, k−1)/C(n, k);
    with replacement P(max ≤ v_(i)) = (i/n)^k. Ties give the same expectation either way."""
    v = np.sort(np.asarray(list(values), dtype=float))
    n = len(v)
    if n == 0 or k < 1 or np.isnan(v).any():
        return math.nan
    i = np.arange(1, n + 1)
    if replace:
        weights = (i / n) ** k - ((i - 1) / n) ** k
    else:
        if k > n:
            raise ValueError(f"{k} draws without replacement from {n} values")
        weights = np.array([math.comb(j - 1, k - 1) for j in i], float) / math.comb(n, k)
    return float(weights @ v)
