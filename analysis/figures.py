"""Report figures (matplotlib Agg, PNG). Each function returns a ``FigureResult``: the path it
wrote (None, with the reason, when there is nothing to draw) and counts of what it drew, so
tests can check a figure without looking at pixels. One fixed colour per family everywhere
(``analysis.style``).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.colors import to_rgb
from matplotlib.lines import Line2D
from matplotlib.ticker import EngFormatter

from analysis.figures_profiles import (
    MIN_PROFILE_PROBLEMS,
    performance_profiles,
    profile_curve,
    profile_score,
)
from analysis.style import (
    FAMILY_COLORS,
    PANEL_H,
    FigureResult,
    arm_label,
    arm_styles,
    arm_suffix,
    diverged_handle,
    family_color,
    family_order,
    legend_outside,
    legend_right,
    mark_diverged,
    panel_grid,
    plain_log_ticks,
    problem_label,
    problems_of,
    save_png,
    setting_style,
    skipped,
)
from study import contract as C

__all__ = ["FAMILY_COLORS", "MIN_PROFILE_PROBLEMS", "FigureResult", "arm_label", "arm_suffix",
           "family_color", "grad_histograms", "learning_curves", "lr_bs_heatmaps",
           "lr_sensitivity", "performance_profiles", "profile_curve", "profile_score",
           "variance_curves"]


def lr_sensitivity(trials: pd.DataFrame, out_dir: Path,
                   metric: str = C.TEST_ACCURACY) -> FigureResult:
    """DeepOBS LR-sensitivity: final accuracy vs LR, a panel per problem × batch size, a line
    per family/variant (seed mean ± std); an x marks a diverged trial."""
    if metric not in trials.columns or trials[metric].notna().sum() == 0:
        return skipped(f"no {metric} logged")
    data = trials[trials["status"].isin(C.RESULT_STATUSES)]
    if data.empty or data[metric].notna().sum() == 0:
        return skipped(f"no {metric} of a finished, stopped or diverged trial")
    problems, sizes = problems_of(data), sorted(data["batch_size"].dropna().unique())
    styles = arm_styles(data)
    fig, axes = panel_grid(len(problems), len(sizes), sharey="row")
    n_series = n_marked = 0
    for r, problem in enumerate(problems):
        for c, size in enumerate(sizes):
            ax = axes[r, c]
            cell = data[(data["dataset"] == problem[0]) & (data["model"] == problem[1])
                        & (data["batch_size"] == size)]
            for (family, arm), part in cell.groupby(["family", "arm"]):
                colour, style, _ = styles[(family, arm_suffix(arm))]
                ok = part[part["status"] != C.DIVERGED].groupby("lr")[metric]
                stats = ok.agg(["mean", "std"]).reset_index()
                if len(stats):
                    ax.errorbar(stats["lr"], 100 * stats["mean"], yerr=100 * stats["std"].fillna(0),
                                color=colour, ls=style, marker="o", ms=4, capsize=2)
                    n_series += 1
                bad = part[part["status"] == C.DIVERGED]
                n_marked += mark_diverged(ax, bad["lr"],
                                          100 * bad[metric].fillna(0.0).clip(lower=0), colour)
            ax.set_xscale("log")
            ax.set_title(f"{problem_label(problem)}, batch size {int(size)}", fontsize=10)
            ax.set_xlabel("learning rate (log scale)")
            if c == 0:
                ax.set_ylabel(f"final {metric.replace('_', ' ')} (%)")
            ax.grid(True, which="major", alpha=0.3)
    handles = [Line2D([], [], color=c, ls=s, marker="o") for c, s, _ in styles.values()]
    labels = [lab for _, _, lab in styles.values()]
    handles.append(diverged_handle())
    labels.append("diverged trial")
    legend_right(fig, handles, labels)
    fig.tight_layout()
    return FigureResult(save_png(fig, Path(out_dir), "lr_sensitivity"), n_panels=axes.size,
                        n_series=n_series, n_marked=n_marked)


def lr_bs_heatmaps(trials: pd.DataFrame, out_dir: Path,
                   metric: str = C.TEST_ACCURACY) -> FigureResult:
    """Seed-mean final accuracy on the LR × batch-size grid, one panel per problem × arm;
    cells say 'div' where a seed diverged and 'err' where no seed is a result (errored,
    interrupted or still running)."""
    if metric not in trials.columns or trials[metric].notna().sum() == 0:
        return skipped(f"no {metric} logged")
    ok = trials[trials["status"].isin(set(C.RESULT_STATUSES) - {C.DIVERGED})]
    if ok[metric].notna().sum() == 0:
        return skipped(f"no {metric} of a finished or stopped trial")
    panels = sorted(trials[["dataset", "model", "arm", "family"]].drop_duplicates()
                    .itertuples(index=False, name=None),
                    key=lambda p: (p[0], p[1], family_order(p[3]), p[2]))
    vmin, vmax = 100 * ok[metric].min(), 100 * ok[metric].max()
    n_cols = min(3, len(panels))
    n_rows = -(-len(panels) // n_cols)
    most_lrs = max(trials.groupby(["dataset", "model", "arm"])["lr"].nunique())
    panel_h = max(PANEL_H, 0.22 * most_lrs + 1.2)  # a 36-point DeepOBS grid stays legible
    fig, axes = panel_grid(n_rows, n_cols, panel_h=panel_h, layout="constrained")
    n_cells = 0
    image = None
    for ax, (dataset, model, arm, family) in zip(axes.flat, panels):
        part = trials[(trials["dataset"] == dataset) & (trials["model"] == model)
                      & (trials["arm"] == arm)]
        lrs, sizes = sorted(part["lr"].unique()), sorted(part["batch_size"].unique())
        grid = np.full((len(lrs), len(sizes)), np.nan)
        for i, lr in enumerate(lrs):
            for j, size in enumerate(sizes):
                cell = part[(part["lr"] == lr) & (part["batch_size"] == size)]
                if cell.empty:
                    continue
                n_cells += 1
                results = cell[cell["status"].isin(C.RESULT_STATUSES)]
                if (results["status"] == C.DIVERGED).any():
                    text = "div"
                elif results.empty:
                    text = "err"
                else:
                    grid[i, j] = 100 * results[metric].mean()
                    text = f"{grid[i, j]:.1f}" if not np.isnan(grid[i, j]) else "–"
                shade = np.isnan(grid[i, j]) or grid[i, j] < (vmin + vmax) / 2
                ax.text(j, i, text, ha="center", va="center", fontsize=8 if len(lrs) < 12 else 6,
                        color="white" if shade and not np.isnan(grid[i, j]) else "black")
        image = ax.imshow(grid, cmap="viridis", vmin=vmin, vmax=vmax, aspect="auto",
                          origin="lower")
        ax.set_xticks(range(len(sizes)), [str(int(s)) for s in sizes])
        ax.set_yticks(range(len(lrs)), [f"{lr:.1e}" for lr in lrs])
        ax.set_xlabel("batch size (examples)")
        ax.set_ylabel("learning rate (log grid)", fontsize=9)
        suffix = arm_suffix(arm)
        title = arm_label(family, suffix)
        ax.set_title(f"{problem_label((dataset, model))}: {title}", fontsize=10,
                     color=family_color(family))
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    if image is not None:
        fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8,
                     label=f"final {metric.replace('_', ' ')} (%)")
    return FigureResult(save_png(fig, Path(out_dir), "lr_bs_heatmaps"), n_panels=len(panels),
                        n_cells=n_cells)


def _seed_mean_curves(metrics: pd.DataFrame, run_ids: list[str], keys: list[str]):
    """Per step, the mean over the given runs of each key (runs of one setting share steps)."""
    part = metrics[metrics["run_id"].isin(run_ids) & metrics["key"].isin(keys)]
    if part.empty:
        return pd.DataFrame()
    return part.pivot_table(index="step", columns="key", values="value", aggfunc="mean")


def _family_rows(best: pd.DataFrame, problem: tuple):
    rows = best[(best["dataset"] == problem[0]) & (best["model"] == problem[1])]
    return sorted(rows.iterrows(), key=lambda item: family_order(item[1]["family"]))


def _setting_label(row) -> str:
    suffix = arm_suffix(row["arm"])
    name = arm_label(row["family"], suffix)
    return f"{name}: B={int(row['batch_size'])}, lr={row['lr']:.2g}"


def _seed_spread(metrics: pd.DataFrame, run_ids: list[str], x: str, y: str) -> pd.DataFrame:
    """Per step over the given runs: mean of ``x``, mean and std (ddof=1) of ``y``, n runs."""
    part = metrics[metrics["run_id"].isin(run_ids) & metrics["key"].isin([x, y])]
    if part.empty:
        return pd.DataFrame()
    wide = part.pivot_table(index=["run_id", "step"], columns="key", values="value",
                            aggfunc="last").reset_index()
    if x not in wide or y not in wide:
        return pd.DataFrame()
    wide = wide.dropna(subset=[x, y])
    return wide.groupby("step").agg(x=(x, "mean"), mean=(y, "mean"), std=(y, "std"),
                                    n=(y, "size")).reset_index()


def learning_curves(metrics: pd.DataFrame, best: pd.DataFrame, out_dir: Path) -> FigureResult:
    """Test accuracy and train loss per unit of work (gradient evaluations), and test accuracy
    against training seconds (``time_s``), at each family's tuned setting: seed means with a
    ±1 std band over seeds where there are several. Colour = family, line style = variant; a
    family whose every LR diverged shows its diverged runs, ending in an x."""
    if best.empty or metrics.empty or C.GRAD_EVALS not in set(metrics["key"]):
        return skipped("no grad_evals history to plot learning curves against")
    problems = problems_of(best)
    fig, axes = panel_grid(len(problems), 3)
    styles = arm_styles(best)
    n_series = n_marked = 0
    panels = ((0, C.GRAD_EVALS, C.TEST_ACCURACY, 100), (1, C.GRAD_EVALS, C.TRAIN_LOSS, 1),
              (2, C.TIME_S, C.TEST_ACCURACY, 100))
    for r, problem in enumerate(problems):
        for _, row in _family_rows(best, problem):
            for col, x, y, scale in panels:
                c = _seed_spread(metrics, row["run_ids"], x, y)
                if c.empty:
                    continue
                ax = axes[r, col]
                colour, style, diverged = setting_style(styles, row)
                ax.plot(c["x"], scale * c["mean"], color=colour, ls=style, marker=".",
                        label=_setting_label(row) + (f" ({int(c['n'].max())} seeds)"
                                                     if c["n"].max() > 1 else ""))
                if diverged:
                    n_marked += mark_diverged(ax, c["x"].iloc[-1:],
                                              scale * c["mean"].iloc[-1:], colour)
                if c["n"].max() > 1:
                    band = scale * c["std"].fillna(0)
                    ax.fill_between(c["x"], scale * c["mean"] - band, scale * c["mean"] + band,
                                    color=colour, alpha=0.2, lw=0)
                n_series += 1
        axes[r, 0].set_ylabel("test accuracy (%)")
        axes[r, 2].set_ylabel("test accuracy (%)")
        axes[r, 1].set_ylabel("train loss (cross-entropy, log scale)")
        axes[r, 1].set_yscale("log")
        plain_log_ticks(axes[r, 1])
        for ax in axes[r, :2]:
            ax.set_xlabel("gradient evaluations (examples)")
            ax.xaxis.set_major_formatter(EngFormatter(sep=""))  # 50k, not 50000100000...
        axes[r, 2].set_xlabel("training time (s, time_s)")
        for ax in axes[r]:
            ax.set_title(problem_label(problem), fontsize=10)
            ax.grid(True, alpha=0.3)
        legend_outside(axes[r, 2])
    fig.tight_layout()
    return FigureResult(save_png(fig, Path(out_dir), "learning_curves"), n_panels=axes.size,
                        n_series=n_series, n_marked=n_marked)


def variance_curves(metrics: pd.DataFrame, best: pd.DataFrame, out_dir: Path) -> FigureResult:
    """Faghri et al.: variance and normalized variance of each family's step direction
    (``var/dir_*``, thick with dots) beside plain SGD's mini-batch gradient at the same weights
    (``var/sgd_*``, thin), at its tuned setting (seed means, log y), against the examples
    seen (iteration × batch size), so that tuned settings of different batch sizes line up.
    Colour = family, line style = variant; an x ends the curve of a setting that diverged."""
    keys = {"var": "variance", "nvar": "normalized variance"}
    dirs = {C.variance_key(C.DIRECTION, k) for k in keys}
    if best.empty or metrics.empty or not dirs & set(metrics["key"]):
        return skipped("no var/dir_var or var/dir_nvar metrics recorded")
    problems = problems_of(best)
    fig, axes = panel_grid(len(problems), 2)
    styles = arm_styles(best)
    n_series = n_marked = 0
    for r, problem in enumerate(problems):
        plotted: dict[str, list[np.ndarray]] = {key: [] for key in keys}
        xs = []
        for _, row in _family_rows(best, problem):
            wanted = [C.variance_key(e, k) for e in (C.DIRECTION, C.SGD_GRADIENT) for k in keys]
            curves = _seed_mean_curves(metrics, row["run_ids"], wanted)
            colour, style, diverged = setting_style(styles, row)
            for ax, stat in zip(axes[r], keys):
                for estimator in (C.DIRECTION, C.SGD_GRADIENT):
                    key = C.variance_key(estimator, stat)
                    if key not in curves or not curves[key].notna().any():
                        continue
                    c = curves[key].dropna()
                    x = c.index.to_numpy(float) * float(row["batch_size"])
                    label = _setting_label(row) + ("" if estimator == C.DIRECTION
                                                   else ": plain SGD, same weights")
                    own = estimator == C.DIRECTION
                    ax.plot(x, c.values, color=colour, ls=style, lw=1.8 if own else 0.8,
                            alpha=1.0 if own else 0.6, marker="." if own else None,
                            label=label)
                    if diverged and own:
                        n_marked += mark_diverged(ax, x[-1:], c.values[-1:], colour)
                    plotted[stat].append(c.values)
                    xs.append(x)
                    n_series += 1
        x_all = np.concatenate(xs) if xs else np.array([1.0])
        log_x = x_all.min() >= 1 and x_all.max() / max(x_all.min(), 1) > 100
        for ax, (stat, name) in zip(axes[r], keys.items()):
            ax.set_yscale("log")
            _clip_degenerate(ax, plotted[stat])
            if log_x:  # measurements are often denser early
                ax.set_xscale("log")
            ax.set_xlabel("examples seen (iteration × batch" + (", log)" if log_x else ")"))
            if not log_x:
                ax.xaxis.set_major_formatter(EngFormatter(sep=""))
            plain_log_ticks(ax)
            ax.set_ylabel(f"{name} (log scale)")
            ax.set_title(f"{problem_label(problem)}\nvar/dir_{stat} (thick), var/sgd_{stat} "
                         "(thin)", fontsize=9)
            ax.grid(True, which="major", alpha=0.3)
        legend_outside(axes[r, 1])
    fig.tight_layout()
    return FigureResult(save_png(fig, Path(out_dir), "variance"), n_panels=axes.size,
                        n_series=n_series, n_marked=n_marked)


def _clip_degenerate(ax, series: list[np.ndarray], span: float = 1e6) -> None:
    """Keep the y-range on the measured spread: a point many decades below the rest (SVRG at
    its snapshot weights, where the direction IS the full gradient: variance 0 up to
    rounding) would otherwise flatten every other curve. Such points are noted, not hidden."""
    values = np.concatenate(series) if series else np.array([])
    values = values[values > 0]
    if values.size == 0:
        return
    floor = np.median(values) / span
    if values.min() < floor:
        ax.set_ylim(bottom=values[values >= floor].min() / 3)
        ax.annotate(f"points below {floor:.0e} not shown", xy=(0.01, 0.01),
                    xycoords="axes fraction", fontsize=7, color="0.4")


def _pooled_histogram(entries: list[dict]):
    """Sum one iteration's per-layer histograms (all layers pooled). Layers with different
    log10 edges are re-binned onto a grid no finer than the coarsest layer (no empty gaps)."""
    first = np.asarray(entries[0]["edges"], float)
    if all(np.array_equal(np.asarray(e["edges"], float), first) for e in entries):
        return first, np.sum([np.asarray(e["counts"], float) for e in entries], axis=0)
    lo = min(e["edges"][0] for e in entries)
    hi = max(e["edges"][-1] for e in entries)
    width = max((e["edges"][-1] - e["edges"][0]) / (len(e["edges"]) - 1) for e in entries)
    edges = np.linspace(lo, hi, max(2, int(np.ceil((hi - lo) / width))) + 1)
    counts = np.zeros(len(edges) - 1)
    for e in entries:
        centres = (np.asarray(e["edges"][:-1]) + np.asarray(e["edges"][1:])) / 2
        counts += np.histogram(centres, bins=edges, weights=np.asarray(e["counts"], float))[0]
    return edges, counts


def grad_histograms(hists: dict[tuple, dict], out_dir: Path, max_lines: int = 5) -> FigureResult:
    """Histograms of |gradient entries| (all layers pooled) on log-log axes, one panel per
    (problem, family) run, one line per logged iteration (darker = later)."""
    hists = {k: v for k, v in hists.items() if v and v.get("layers")}
    if not hists:
        return skipped(f"no {C.GRAD_HIST} artifacts available")
    keys = sorted(hists)
    n_cols = min(3, len(keys))
    n_rows = -(-len(keys) // n_cols)
    fig, axes = panel_grid(n_rows, n_cols)
    n_series = 0
    for ax, key in zip(axes.flat, keys):
        dataset, model, family = key[:3]
        label = key[3] if len(key) > 3 else family  # e.g. 'sgd (momentum)'
        lo_hi = []
        by_iter: dict[int, list] = {}
        for entries in hists[key]["layers"].values():
            for e in entries:
                by_iter.setdefault(int(e[C.ITERATION]), []).append(e)
        iterations = sorted(by_iter)
        pick = [iterations[int(i)] for i in np.unique(np.linspace(0, len(iterations) - 1,
                                                                  min(max_lines, len(iterations))))]
        base = np.array(to_rgb(family_color(family)))
        for k, it in enumerate(pick):
            edges, counts = _pooled_histogram(by_iter[it])
            shade = 0.25 + 0.75 * (k + 1) / len(pick)
            colour = 1 - shade * (1 - base)  # light (early) -> full family colour (late)
            nonzero = np.flatnonzero(counts)
            if len(nonzero):
                lo_hi += [edges[nonzero[0]], edges[nonzero[-1] + 1]]
            ax.stairs(np.where(counts > 0, counts, np.nan), 10 ** edges, color=colour,
                      label=f"iteration {it}", lw=1.5)
            n_series += 1
        ax.set_xscale("log")
        ax.set_yscale("log")
        if lo_hi:  # show the occupied decades, not the whole logged range
            ax.set_xlim(10 ** (min(lo_hi) - 0.5), 10 ** (max(lo_hi) + 0.5))
        ax.set_xlabel("|gradient entry| (log scale)")
        ax.set_ylabel("number of entries (log scale)")
        ax.set_title(f"{problem_label((dataset, model))}: {label}", fontsize=10,
                     color=family_color(family))
        ax.legend(fontsize=7, loc="best", framealpha=0.8)
        ax.grid(True, which="major", alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.tight_layout()
    return FigureResult(save_png(fig, Path(out_dir), "grad_histograms"), n_panels=len(keys),
                        n_series=n_series)
