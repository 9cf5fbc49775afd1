"""The statistics a claim may name: one small function each, registered under the name the spec
uses (``study.contract.CLAIM_STATISTICS`` lists the names and parameters so that a spec is
checked before a sweep starts, without importing the analysis). A function gets a ``Context``
(the study's runs) and the claim's parameters, and returns an ``analysis.stats.Estimate`` (a
value, its 95% interval where it has one) or raises ``Missing`` with the reason the runs
cannot answer. Adding a statistic: one entry in ``CLAIM_STATISTICS``, one function here.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import pandas as pd

from analysis import stats
from analysis.tables import best_settings, usable
from study import contract as C


class Missing(Exception):
    """The runs do not hold what the statistic needs; the message says what is missing."""


@dataclass(frozen=True)
class Statistic:
    name: str
    fn: Callable[..., stats.Estimate]
    required: tuple[str, ...]
    optional: tuple[str, ...]
    unit: str = ""
    digits: int = 2


STATISTICS: dict[str, Statistic] = {}


def statistic(unit: str = "", digits: int = 2):
    """Register ``fn`` under its own name with the parameters the contract gives that name."""
    def register(fn):
        required, optional = C.CLAIM_STATISTICS[fn.__name__]
        STATISTICS[fn.__name__] = Statistic(fn.__name__, fn, required, optional, unit, digits)
        return fn
    return register


@dataclass
class Context:
    """The study's runs as the statistics see them; tuned settings are picked by ``select``
    (validation accuracy by default: never by test data)."""

    trials: pd.DataFrame
    metrics: pd.DataFrame
    select: str = C.VAL_ACCURACY
    _cache: dict = field(default_factory=dict)

    @cached_property
    def best(self) -> pd.DataFrame:
        return best_settings(self.trials, self.select)

    def problem(self, model: str | None, dataset: str | None) -> tuple[str, str]:
        """(dataset, model): the one named, or the study's only one."""
        found = []
        for col, wanted in (("dataset", dataset), ("model", model)):
            known = sorted(map(str, self.trials[col].dropna().unique()))
            if wanted is None:
                if len(known) != 1:
                    raise Missing(f"the study has {col}s {', '.join(known)}: name one in "
                                  f"params.{col}")
                wanted = known[0]
            elif str(wanted) not in known:
                raise Missing(f"no run of {col} {wanted!r} (the runs have {', '.join(known)})")
            found.append(str(wanted))
        return found[0], found[1]

    def tuned(self, family: str, model=None, dataset=None) -> pd.Series:
        """The family's tuned setting on the problem (raises Missing without one)."""
        ds, mo = self.problem(model, dataset)
        rows = self.best[(self.best["dataset"] == ds) & (self.best["model"] == mo)
                         & (self.best["family"] == family)]
        if rows.empty:
            raise Missing(f"no result of family {family!r} on {ds} / {mo}")
        row = rows.iloc[0]
        if pd.isna(row["score"]):
            raise Missing(f"family {family!r} has no tuned setting on {ds} / {mo} (every LR "
                          "diverged)")
        return row

    def finals(self, row: pd.Series, metric: str) -> dict:
        """seed -> final ``metric`` of the runs of a tuned setting."""
        if metric not in self.trials:
            raise Missing(f"no {metric} was logged")
        runs = self.trials.set_index("run_id").loc[row["run_ids"]]
        seeds = runs["seed"] if "seed" in runs else pd.Series(runs.index, index=runs.index)
        return {s: float(v) for s, v in zip(seeds, runs[metric]) if pd.notna(v)}

    def histories(self, row: pd.Series, keys: list[str]) -> list[pd.DataFrame]:
        """Per run of a tuned setting: step × key of the given metric histories."""
        part = self.metrics[self.metrics["run_id"].isin(row["run_ids"])
                            & self.metrics["key"].isin(keys)]
        return [run.pivot_table(index="step", columns="key", values="value", aggfunc="last")
                for _, run in part.groupby("run_id")]


def var_key(name: str) -> str:
    """'dir_var' or 'var/dir_var' -> 'var/dir_var'."""
    return name if name.startswith(C.VARIANCE_PREFIX) else C.VARIANCE_PREFIX + name


# -- the statistics ------------------------------------------------------------------------------

@statistic(unit="%", digits=1)
def best_test_accuracy(ctx: Context, family, model=None, dataset=None) -> stats.Estimate:
    """Final test accuracy (%) at the family's tuned setting: mean over seeds, t-interval."""
    values = ctx.finals(ctx.tuned(family, model, dataset), C.TEST_ACCURACY)
    if not values:
        raise Missing(f"no test accuracy of {family}'s tuned setting")
    return stats.mean_ci(values.values()).scaled(100)


@statistic(unit=" pp", digits=1)
def accuracy_difference(ctx: Context, family, baseline="sgd", model=None,
                        dataset=None) -> stats.Estimate:
    """Test accuracy of ``family`` minus ``baseline`` (percentage points), each at its tuned
    setting: paired by seed when both ran the same seeds (≥ 2), else Welch's t-test."""
    a = ctx.finals(ctx.tuned(family, model, dataset), C.TEST_ACCURACY)
    b = ctx.finals(ctx.tuned(baseline, model, dataset), C.TEST_ACCURACY)
    if set(a) == set(b) and len(a) >= 2:
        seeds = sorted(a)
        return stats.paired([a[s] for s in seeds], [b[s] for s in seeds]).scaled(100)
    return stats.welch(list(a.values()), list(b.values())).scaled(100)


@statistic(unit="×", digits=3)
def variance_ratio_late_early(ctx: Context, estimator, family, model=None,
                              dataset=None) -> stats.Estimate:
    """Mean of ``var/<estimator>`` over the last third of a run's measurements divided by the
    mean over its first third, at the family's tuned setting; the geometric mean over seeds
    with the t-interval of the log-ratios."""
    key = var_key(estimator)
    logs = []
    for hist in ctx.histories(ctx.tuned(family, model, dataset), [key]):
        series = hist[key].dropna().sort_index() if key in hist else pd.Series(dtype=float)
        if len(series) < 3:
            continue
        k = math.ceil(len(series) / 3)
        early, late = series.iloc[:k].mean(), series.iloc[-k:].mean()
        if early > 0 and late > 0:
            logs.append(math.log(late / early))
    if not logs:
        raise Missing(f"no run of {family}'s tuned setting has 3 or more positive {key} "
                      "measurements")
    est = stats.mean_ci(logs)
    return stats.Estimate(math.exp(est.value), math.exp(est.low), math.exp(est.high), est.n,
                          method="geometric mean over seeds of late/early, t-interval of logs",
                          note=est.note)


@statistic(unit="", digits=2)
def fraction_of_training_between(ctx: Context, lower, upper, value, family, model=None,
                                 dataset=None) -> stats.Estimate:
    """Share of a run's measurements at which ``lower ≤ value ≤ upper`` (three variance keys
    measured at the same steps), at the family's tuned setting; mean over seeds, t-interval."""
    keys = [var_key(lower), var_key(upper), var_key(value)]
    shares = []
    for hist in ctx.histories(ctx.tuned(family, model, dataset), keys):
        if not set(keys) <= set(hist.columns):
            continue
        both = hist[list(dict.fromkeys(keys))].dropna()   # lower may be upper
        if len(both):
            lo, hi, v = (both[k].to_numpy() for k in keys)
            shares.append(float(np.mean((lo <= v) & (v <= hi))))
    if not shares:
        raise Missing(f"no run of {family}'s tuned setting measured {', '.join(keys)} at the "
                      "same steps")
    est = stats.mean_ci(shares)
    return stats.Estimate(est.value, est.low, est.high, est.n,
                          method="mean over seeds of the share of measurements, t-interval",
                          note=est.note)


@statistic(unit="", digits=2)
def rank_correlation(ctx: Context, x, y, family=None, model=None,
                     dataset=None) -> stats.Estimate:
    """Spearman's ρ between the final ``x`` and ``y`` of every non-diverged result trial
    (optionally one family / model / dataset), with its Fisher-z interval."""
    runs = usable(ctx.trials)
    runs = runs[runs["status"] != C.DIVERGED]
    for col, wanted in (("family", family), ("model", model), ("dataset", dataset)):
        if wanted is not None:
            runs = runs[runs[col].astype(str) == str(wanted)]
    for metric in (x, y):
        if metric not in runs or runs[metric].notna().sum() == 0:
            raise Missing(f"no final {metric} in the selected runs")
    est = stats.spearman(runs[x], runs[y])
    if math.isnan(est.value):
        raise Missing(f"Spearman's ρ of {x} and {y}: {est.note}")
    return est


@statistic(unit="", digits=2)
def largest_logged(ctx: Context, key, family, model=None, dataset=None) -> stats.Estimate:
    """The largest value of a logged series ``key`` (e.g. grad_log10_span, wt/frac_scaled) over
    each run of the family's tuned setting; mean over seeds, t-interval."""
    peaks = [float(h[key].max()) for h in ctx.histories(ctx.tuned(family, model, dataset), [key])
             if key in h and h[key].notna().any()]
    if not peaks:
        raise Missing(f"no run of {family}'s tuned setting logged {key}")
    return stats.mean_ci(peaks)


@statistic(unit=" pp", digits=1)
def generalization_gap_difference(ctx: Context, family, baseline="sgd", model=None,
                                  dataset=None) -> stats.Estimate:
    """(train − test accuracy) of ``family`` minus that of ``baseline`` at their tuned settings,
    in percentage points: < 0 when ``family`` overfits less. Paired by seed when both ran the
    same ≥ 2 seeds, else Welch's t-test."""
    gaps = []
    for fam in (family, baseline):
        row = ctx.tuned(fam, model, dataset)
        train, test = ctx.finals(row, C.TRAIN_ACCURACY), ctx.finals(row, C.TEST_ACCURACY)
        gaps.append({s: train[s] - test[s] for s in train if s in test})
    a, b = gaps
    if set(a) == set(b) and len(a) >= 2:
        seeds = sorted(a)
        return stats.paired([a[s] for s in seeds], [b[s] for s in seeds]).scaled(100)
    return stats.welch(list(a.values()), list(b.values())).scaled(100)


# statistics about speed to a target loss live beside these (registered on import)
from analysis import claim_stats_speed  # noqa: E402,F401
