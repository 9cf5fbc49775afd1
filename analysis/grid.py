"""Where a tuned learning rate sits in the grid it was picked from. A best LR at the smallest
or largest value tried says the optimum may lie outside the grid: the comparison is then
between a tuned family and one that was not, so every table that shows a best setting carries
the ``edge`` column this module computes ("low", "high", "only" for a one-LR grid, else "").
"""
from __future__ import annotations

import math

import pandas as pd

from study import contract as C

GRID_KEYS = ("dataset", "model", "family", "variant", "arm", "batch_size")
EDGE = "edge"


def lr_grids(trials: pd.DataFrame) -> pd.DataFrame:
    """Per setting (GRID_KEYS present): the smallest and largest LR with a result (finished,
    stopped or diverged: a diverged top LR closes the grid) and the number of LRs."""
    keys = [k for k in GRID_KEYS if k in trials.columns]
    results = trials[trials["status"].isin(C.RESULT_STATUSES)]
    if results.empty or "lr" not in results:
        return pd.DataFrame(columns=keys + ["lr_min", "lr_max", "n_lr_tried"])
    return results.groupby(keys, dropna=False)["lr"].agg(
        lr_min="min", lr_max="max", n_lr_tried="nunique").reset_index()


def edge_of(lr: float, low: float, high: float, n: int) -> str:
    if lr is None or pd.isna(lr) or pd.isna(low):
        return ""
    if n <= 1:
        return "only"
    if math.isclose(lr, low, rel_tol=1e-9) or lr < low:
        return "low"
    if math.isclose(lr, high, rel_tol=1e-9) or lr > high:
        return "high"
    return ""


def with_edge(frame: pd.DataFrame, trials: pd.DataFrame, lr_col: str = "lr") -> pd.DataFrame:
    """``frame`` with an ``edge`` column right after ``lr_col`` (frame rows are settings)."""
    frame = frame.drop(columns=[EDGE], errors="ignore")
    keys = [k for k in GRID_KEYS if k in frame.columns and k in trials.columns]
    if frame.empty or lr_col not in frame or not keys:
        out = frame.copy()
        out.insert(len(out.columns), EDGE, pd.Series("", index=out.index, dtype=object))
        return out
    grids = lr_grids(trials[[*keys, "lr", "status"]])
    grids = grids.groupby(keys, dropna=False).agg(
        lr_min=("lr_min", "min"), lr_max=("lr_max", "max"),
        n_lr_tried=("n_lr_tried", "max")).reset_index()
    merged = frame[keys].merge(grids, on=keys, how="left")
    edges = [edge_of(lr, lo, hi, n) for lr, lo, hi, n in zip(
        frame[lr_col], merged["lr_min"], merged["lr_max"], merged["n_lr_tried"].fillna(0))]
    out = frame.copy()
    out.insert(list(out.columns).index(lr_col) + 1, EDGE, edges)
    return out
