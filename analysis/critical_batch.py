"""The critical batch size (McCandlish et al. 2018, "An Empirical Model of Large-Batch
Training"): steps S and examples E = B·S to reach a target training loss, per batch size at
its best learning rate, and the fit of the Pareto front

    (S/S_min − 1)(E/E_min − 1) = 1,   B_crit = E_min / S_min.

With E = B·S the front is S(B) = S_min + E_min/B, linear in (S_min, E_min): fitted by least
squares on relative residuals (S_i − S_min − E_min/B_i)/S_i, so a batch size's weight does
not grow with its step count; both parameters kept ≥ 0. The measured B_simple is pooled as
the report pools it (mean tr(Σ) / mean |G|², their App. A) over the measurements the
frontier trials took in the second half of their way to the target (the noise scale grows
as the loss falls, so the start of training would understate it).
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

from study import contract as C


def steps_to_target(steps, values, target: float) -> float:
    """The first step at which ``values`` (a falling loss logged at ``steps``) reaches
    ``target``: linear interpolation between the last point above and the first at or below
    it (epochs are coarse at small batch sizes); 0 if it starts there, NaN if never."""
    steps, values = np.asarray(steps, float), np.asarray(values, float)
    order = np.argsort(steps)
    steps, values = steps[order], values[order]
    hit = np.flatnonzero(values <= target)
    if hit.size == 0:
        return math.nan
    i = int(hit[0])
    if i == 0:
        return float(steps[0])
    s0, s1, v0, v1 = steps[i - 1], steps[i], values[i - 1], values[i]
    return float(s0 + (s1 - s0) * (v0 - target) / (v0 - v1))


def fit_front(batch_sizes, steps) -> dict[str, float]:
    """S_min, E_min and B_crit = E_min/S_min of S(B) = S_min + E_min/B (module docstring),
    with the relative rms residual of the fit."""
    b = np.asarray(batch_sizes, float)
    s = np.asarray(steps, float)
    keep = np.isfinite(s) & (s > 0)
    b, s = b[keep], s[keep]
    if len(b) < 2:
        return {"s_min": math.nan, "e_min": math.nan, "b_crit": math.nan,
                "rel_rms": math.nan, "n_points": len(b)}
    design = np.stack([1 / s, 1 / (b * s)], axis=1)      # (S_min + E_min/B)/S = 1
    coef = _nonnegative_lstsq(design, np.ones_like(s))
    s_min, e_min = map(float, coef)
    fitted = s_min + e_min / b
    rel = float(np.sqrt(np.mean(((s - fitted) / s) ** 2)))
    b_crit = e_min / s_min if s_min > 0 else math.inf
    return {"s_min": s_min, "e_min": e_min, "b_crit": b_crit, "rel_rms": rel,
            "n_points": len(b)}


def _nonnegative_lstsq(a: np.ndarray, y: np.ndarray) -> np.ndarray:
    """min |a x − y|² with x ≥ 0 for two unknowns: the unconstrained solution, or the best
    with one of them at 0."""
    x, *_ = np.linalg.lstsq(a, y, rcond=None)
    if (x >= 0).all():
        return x
    best, best_err = np.zeros(2), float(np.sum(y ** 2))
    for j in range(2):
        col = a[:, j]
        xj = max(float(col @ y / (col @ col)), 0.0)
        err = float(np.sum((col * xj - y) ** 2))
        if err < best_err:
            best, best_err = np.eye(2)[j] * xj, err
    return best


def frontier(trials: pd.DataFrame, metrics: pd.DataFrame, target: float,
             metric: str = C.TRAIN_LOSS) -> pd.DataFrame:
    """Per (model, family, batch size): steps to ``target`` of every lr (seed mean; an lr
    counts only if every seed reached it), and the best lr's S and E = B·S. ``step`` of a
    per-epoch metric is the iteration it was logged at."""
    results = trials[trials["status"].isin(C.RESULT_STATUSES)]
    curves = metrics[metrics["key"] == metric]
    rows = []
    for run_id, run in results.set_index("run_id").iterrows():
        mine = curves[curves["run_id"] == run_id]
        rows.append({"run_id": run_id, "model": run["model"], "family": run["family"],
                     "batch_size": int(run["batch_size"]), "lr": float(run["lr"]),
                     "steps": steps_to_target(mine["step"], mine["value"], target)})
    if not rows:
        return pd.DataFrame(columns=["model", "family", "batch_size", "lr", "steps",
                                     "examples", "n_lr", "run_ids"])
    per_run = pd.DataFrame(rows)
    keys = ["model", "family", "batch_size"]
    per_lr = per_run.groupby(keys + ["lr"]).agg(
        steps=("steps", lambda v: v.mean() if v.notna().all() else math.nan),
        run_ids=("run_id", list)).reset_index()
    out = []
    for key, group in per_lr.groupby(keys):
        reached = group.dropna(subset=["steps"])
        n_lr = group["lr"].nunique()
        if reached.empty:
            out.append({**dict(zip(keys, key)), "lr": math.nan, "steps": math.nan,
                        "examples": math.nan, "n_lr": n_lr, "edge": "", "run_ids": []})
            continue
        best = reached.loc[reached["steps"].idxmin()]
        lrs = sorted(group["lr"])
        edge = "low" if best["lr"] == lrs[0] else "high" if best["lr"] == lrs[-1] else ""
        out.append({**dict(zip(keys, key)), "lr": best["lr"], "steps": best["steps"],
                    "examples": best["steps"] * key[2], "n_lr": n_lr,
                    "edge": edge if n_lr > 1 else "", "run_ids": best["run_ids"]})
    return pd.DataFrame(out)


def pooled_noise_scale_near_target(metrics: pd.DataFrame, front: pd.DataFrame) -> float:
    """Mean tr(Σ) / mean |G|² over the frontier trials' measurements taken in the second half
    of their way to the target (iterations in [S/2, S]); NaN without measurements."""
    trace, grad_sq = [], []
    for _, row in front.dropna(subset=["steps"]).iterrows():
        mine = metrics[metrics["run_id"].isin(row["run_ids"])
                       & metrics["step"].between(row["steps"] / 2, row["steps"])]
        trace += list(mine.loc[mine["key"] == C.TRACE_SIGMA, "value"])
        grad_sq += list(mine.loc[mine["key"] == C.GRAD_SQ_UNBIASED, "value"])
    if not trace or not grad_sq:
        return math.nan
    denominator = float(np.mean(grad_sq))
    return float(np.mean(trace)) / denominator if denominator > 0 else math.inf


def noise_scale_growth(metrics: pd.DataFrame, run_ids: list[str]) -> float:
    """Pooled B_simple of the second half of each run's measurements over that of the first
    half (pooled over ``run_ids``): > 1 when the noise scale grows as training goes on."""
    halves = {0: ([], []), 1: ([], [])}
    for run_id in run_ids:
        mine = metrics[metrics["run_id"] == run_id]
        trace = mine[mine["key"] == C.TRACE_SIGMA].sort_values("step")
        grad_sq = mine[mine["key"] == C.GRAD_SQ_UNBIASED].sort_values("step")
        n = len(trace)
        if n < 2 or len(grad_sq) != n:
            continue
        for half, part in ((0, slice(0, n // 2)), (1, slice(n - n // 2, n))):
            halves[half][0].extend(trace["value"].iloc[part])
            halves[half][1].extend(grad_sq["value"].iloc[part])
    pooled = []
    for trace, grad_sq in halves.values():
        if not trace or np.mean(grad_sq) <= 0:
            return math.nan
        pooled.append(np.mean(trace) / np.mean(grad_sq))
    return float(pooled[1] / pooled[0])
