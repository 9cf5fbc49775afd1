"""Figures of the reproduction studies, drawn when a study has what they need: every variance
estimator measured along one trajectory (Faghri et al.'s Fig. 2: shadows logged as
``var/<name>_*``), and the steps–examples front to a target loss with its critical-batch fit
(McCandlish et al.'s Fig. 3), B_simple marked."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from analysis import critical_batch as cb
from analysis.style import (
    FigureResult,
    arm_label,
    arm_suffix,
    panel_grid,
    plain_log_ticks,
    save_png,
    skipped,
)
from study import contract as C

STATS = {"var": "variance", "nvar": "normalized variance"}
FLOOR = 1e-3   # y axis bottom: at most this far below the median (a value of ~0 runs off it)


def estimators_of(metrics: pd.DataFrame) -> list[str]:
    """The estimators with a ``var/<name>_var`` series: the trial's own (dir), plain SGD at
    its weights (sgd) and any shadows, in that order."""
    suffix = "_var"
    names = {k[len(C.VARIANCE_PREFIX):-len(suffix)] for k in metrics["key"].unique()
             if k.startswith(C.VARIANCE_PREFIX) and k.endswith(suffix)}
    first = [n for n in (C.DIRECTION, C.SGD_GRADIENT) if n in names]
    return first + sorted(names - set(first))


def estimator_curves(metrics: pd.DataFrame, best: pd.DataFrame, out_dir: Path) -> FigureResult:
    """Variance and normalized variance of every estimator against iterations, one line each,
    on one trajectory: the first seed's run of each tuned setting. Skipped unless the study
    measured shadow estimators (without them the variance figure already shows dir and sgd)."""
    names = estimators_of(metrics) if not metrics.empty else []
    if len([n for n in names if n not in (C.DIRECTION, C.SGD_GRADIENT)]) == 0 or best.empty:
        return skipped("no shadow estimators (measure.estimators) were measured")
    rows = [r for _, r in best.iterrows() if r["run_ids"]]
    fig, axes = panel_grid(len(rows), 2)
    n_series = 0
    for r, row in enumerate(rows):
        run = metrics[metrics["run_id"] == row["run_ids"][0]]
        for ax, (stat, title) in zip(axes[r], STATS.items()):
            values = []
            for name in names:
                series = run[run["key"] == C.variance_key(name, stat)].sort_values("step")
                if series.empty:
                    continue
                ax.plot(series["step"], series["value"], marker=".",
                        ls=":" if name == C.DIRECTION else "-", label=_label(name))
                values += list(series["value"])
                n_series += 1
            ax.set_yscale("log")
            positive = np.array([v for v in values if v > 0])
            if positive.size:   # SVRG right after a snapshot is ~0: keep the curves readable
                ax.set_ylim(bottom=max(positive.min(), np.median(positive) * FLOOR) / 2)
            plain_log_ticks(ax)
            ax.set_xlabel("iteration")
            ax.set_ylabel(f"{title} (log scale)")
            name = arm_label(row["family"], arm_suffix(row.get("arm", "default")))  # variant
            ax.set_title(f"{row['model']} {name} lr={row['lr']:.3g} "
                         f"B={int(row['batch_size'])}: one trajectory", fontsize=9)
            ax.legend(fontsize=7)
    path = save_png(fig, Path(out_dir), "estimators")
    return FigureResult(path, n_panels=2 * len(rows), n_series=n_series)


def _label(name: str) -> str:
    return {C.DIRECTION: "the trial's update (dir)", C.SGD_GRADIENT: "SGD at B (sgd)",
            "sgd_2b": "SGD at 2B (sgd_2b)"}.get(name, name)


def critical_batch_front(trials: pd.DataFrame, metrics: pd.DataFrame,
                         targets: list[tuple[str, float]], out_dir: Path) -> FigureResult:
    """Per (family, target loss): steps S against examples E to the target at each batch
    size's best lr (log-log), the fitted front (S/S_min − 1)(E/E_min − 1) = 1 and the batch
    size B_simple would predict (the pooled noise scale near the target) marked on it."""
    if not targets or trials.empty:
        return skipped("no claim names a critical-batch target")
    fig, axes = panel_grid(1, len(targets))
    n_series = n_marked = 0
    for ax, (family, target) in zip(axes[0], targets):
        front = cb.frontier(trials[trials["family"] == family], metrics, target)
        front = front.dropna(subset=["steps"])
        if front.empty:
            ax.set_title(f"{family}: no batch size reached loss {target}", fontsize=9)
            continue
        ax.scatter(front["examples"], front["steps"], color="C0", zorder=3,
                   label="best lr per batch size")
        for _, p in front.iterrows():
            ax.annotate(f"B={int(p['batch_size'])}" + (f" ({p['edge']} edge)" if p["edge"]
                                                        else ""),
                        (p["examples"], p["steps"]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
        n_series += 1
        fit = cb.fit_front(front["batch_size"], front["steps"])
        title = f"{family}: to train loss {target}"
        if np.isfinite(fit["b_crit"]) and fit["s_min"] > 0:
            b = np.geomspace(front["batch_size"].min() / 2, front["batch_size"].max() * 2, 100)
            s = fit["s_min"] + fit["e_min"] / b
            ax.plot(b * s, s, color="C1", label=f"fit: B_crit = {fit['b_crit']:.0f}")
            n_series += 1
            b_simple = cb.pooled_noise_scale_near_target(metrics, front)
            if np.isfinite(b_simple) and b_simple > 0:
                s_at = fit["s_min"] + fit["e_min"] / b_simple
                ax.scatter([b_simple * s_at], [s_at], marker="*", s=150, color="C3", zorder=4,
                           label=f"B_simple = {b_simple:.0f} (pooled near the target)")
                n_marked += 1
        ax.set_xscale("log")
        ax.set_yscale("log")
        plain_log_ticks(ax, "x")
        plain_log_ticks(ax, "y")
        ax.set_xlabel("examples to target E")
        ax.set_ylabel("steps to target S")
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7)
    path = save_png(fig, Path(out_dir), "critical_batch_front")
    return FigureResult(path, n_panels=len(targets), n_series=n_series, n_marked=n_marked)


def critical_batch_targets(claims: list[dict]) -> list[tuple[str, float]]:
    """(family, target) of every claim about the critical batch, in order, once each."""
    out = []
    for claim in claims:
        params = claim.get("params") or {}
        if claim.get("statistic") in CRITICAL_BATCH_STATISTICS and "target" in params:
            key = (str(params.get("family")), float(params["target"]))
            if key not in out:
                out.append(key)
    return out


CRITICAL_BATCH_STATISTICS = ("critical_batch_over_noise_scale", "noise_scale_growth")
