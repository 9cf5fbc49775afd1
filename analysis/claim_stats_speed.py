"""Claim statistics about speed to a target training loss (McCandlish et al.'s critical batch,
Faghri et al.'s "normalized variance predicts convergence speed"); registered beside those in
``analysis.claim_stats``. Intervals come from a seeded bootstrap over trials (or over the
front's batch sizes), named in each estimate's method."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

from analysis import critical_batch as cb
from analysis import stats
from analysis.claim_stats import Context, Missing, statistic, var_key
from study import contract as C

BOOTSTRAP, BOOTSTRAP_SEED = 2000, 0


def _runs(ctx: Context, family, model, dataset) -> pd.DataFrame:
    ds, mo = ctx.problem(model, dataset)
    runs = ctx.trials[(ctx.trials["status"].isin(C.RESULT_STATUSES))
                      & (ctx.trials["family"] == family) & (ctx.trials["model"] == mo)
                      & (ctx.trials["dataset"] == ds)]
    if runs.empty:
        raise Missing(f"no result of family {family!r} on {ds} / {mo}")
    return runs


def _bootstrap(n: int, fn, value: float, method: str, n_units: int) -> stats.Estimate:
    """Percentile interval of ``fn(indices)`` over resamples of ``n`` units."""
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    draws = [fn(rng.integers(0, n, n)) for _ in range(BOOTSTRAP)]
    draws = np.array([d for d in draws if np.isfinite(d)])
    if len(draws) < BOOTSTRAP / 2:
        return stats.Estimate(value, n=n_units, method=method,
                              note="the bootstrap was undefined on most resamples")
    low, high = np.quantile(draws, [0.025, 0.975])
    return stats.Estimate(value, float(low), float(high), n_units,
                          method=f"{method}; 95% percentile bootstrap ({BOOTSTRAP}, seed "
                                 f"{BOOTSTRAP_SEED})")


def _abs_spearman(x: np.ndarray, y: np.ndarray) -> float:
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return math.nan
    rx, ry = pd.Series(x).rank().to_numpy(), pd.Series(y).rank().to_numpy()
    return abs(float(np.corrcoef(rx, ry)[0, 1]))


@statistic(unit="", digits=2)
def speed_prediction_advantage(ctx: Context, better, worse, target, family, model=None,
                               dataset=None) -> stats.Estimate:
    """|Spearman ρ| of each run's mean ``better`` (e.g. var/sgd_nvar) with its steps to a
    training loss ``target``, minus the same for ``worse`` (var/sgd_var): > 0 when ``better``
    ranks the runs' convergence speed more faithfully. Runs that never reach the target
    count as the slowest (rank ties at the end)."""
    runs = _runs(ctx, family, model, dataset)
    keys = [var_key(better), var_key(worse)]
    rows = []
    for run_id in runs["run_id"]:
        mine = ctx.metrics[ctx.metrics["run_id"] == run_id]
        loss = mine[mine["key"] == C.TRAIN_LOSS]
        means = [mine.loc[mine["key"] == k, "value"].mean() for k in keys]
        steps = cb.steps_to_target(loss["step"], loss["value"], float(target))
        if all(np.isfinite(means)):
            rows.append((*means, steps))
    if len(rows) < 4:
        raise Missing(f"{len(rows)} runs of {family} measured {' and '.join(keys)}; need 4")
    data = np.array(rows, dtype=float)
    never = ~np.isfinite(data[:, 2])
    data[never, 2] = np.nanmax(np.append(data[~never, 2], 0)) * 10 + 1   # slowest, tied
    if never.all():
        raise Missing(f"no run of {family} reached training loss {target}")

    def advantage(idx):
        part = data[idx]
        return _abs_spearman(part[:, 0], part[:, 2]) - _abs_spearman(part[:, 1], part[:, 2])
    return _bootstrap(len(data), advantage, advantage(np.arange(len(data))),
                      f"|ρ({keys[0]}, steps)| − |ρ({keys[1]}, steps)| over {len(data)} runs",
                      len(data))


def _front(ctx: Context, target, family, model, dataset) -> pd.DataFrame:
    runs = _runs(ctx, family, model, dataset)
    front = cb.frontier(runs, ctx.metrics, float(target)).dropna(subset=["steps"])
    if len(front) < 3:
        raise Missing(f"{len(front)} batch sizes of {family} reached training loss {target}; "
                      "the front needs 3")
    return front


@statistic(unit="×", digits=2)
def critical_batch_over_noise_scale(ctx: Context, target, family, model=None,
                                    dataset=None) -> stats.Estimate:
    """B_crit of the fitted S–E front over the pooled B_simple measured near the target
    (``analysis.critical_batch``); 1 = the noise scale predicts the critical batch exactly."""
    front = _front(ctx, target, family, model, dataset).reset_index(drop=True)
    b_simple = cb.pooled_noise_scale_near_target(ctx.metrics, front)
    if not np.isfinite(b_simple) or b_simple <= 0:
        raise Missing(f"no usable B_simple near the target (pooled: {b_simple})")

    def ratio(idx):
        part = front.iloc[idx]
        if part["batch_size"].nunique() < 3:
            return math.nan
        return cb.fit_front(part["batch_size"], part["steps"])["b_crit"] / b_simple
    return _bootstrap(len(front), ratio, ratio(np.arange(len(front))),
                      f"B_crit / pooled B_simple ({b_simple:.0f}); front of {len(front)} "
                      "batch sizes, resampled", len(front))


@statistic(unit="×", digits=2)
def noise_scale_growth(ctx: Context, target, family, model=None,
                       dataset=None) -> stats.Estimate:
    """Pooled B_simple of the second half of each frontier run's measurements over the first
    half: geometric mean over the front's runs, t-interval of the log-ratios. > 1: the noise
    scale grows as the loss falls."""
    front = _front(ctx, target, family, model, dataset)
    logs = []
    for run_ids in front["run_ids"]:
        growth = cb.noise_scale_growth(ctx.metrics, list(run_ids))
        if np.isfinite(growth) and growth > 0:
            logs.append(math.log(growth))
    if len(logs) < 2:
        raise Missing("fewer than 2 frontier runs with a positive pooled B_simple in both halves")
    est = stats.mean_ci(logs)
    return stats.Estimate(math.exp(est.value), math.exp(est.low), math.exp(est.high), est.n,
                          method="geometric mean over the front's runs of late/early pooled "
                                 "B_simple, t-interval of logs", note=est.note)
