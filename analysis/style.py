"""Shared look of every report figure: one fixed colour per family, the family order,
variant labels, panel grids, plain log-axis ticks, legends that never hide data, and the
``FigureResult`` each figure function returns."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.ticker import FuncFormatter, NullFormatter

log = logging.getLogger(__name__)

FAMILY_COLORS = {"sgd": "#1f77b4", "adam": "#ff7f0e", "snr": "#2ca02c",
                 "well_tempered": "#d62728", "kfac": "#9467bd", "svrg": "#8c564b",
                 "gc": "#e377c2"}
_SPARE_COLORS = ("#7f7f7f", "#bcbd22", "#17becf", "#393b79", "#637939")
LINESTYLES = ("-", "--", ":", "-.")
PANEL_W, PANEL_H, DPI = 4.2, 3.2, 120


def family_order(family: str) -> tuple:
    """Sort key: the project's family order first (as in FAMILY_COLORS), then by name."""
    order = list(FAMILY_COLORS)
    return (order.index(family) if family in order else len(order), family)


def family_color(family: str) -> str:
    """Fixed colour of a family; families outside the dict get a stable spare colour."""
    if family in FAMILY_COLORS:
        return FAMILY_COLORS[family]
    return _SPARE_COLORS[sum(map(ord, family)) % len(_SPARE_COLORS)]


@dataclass
class FigureResult:
    path: Path | None
    reason: str = ""
    n_panels: int = 0
    n_series: int = 0
    n_cells: int = 0
    n_marked: int = 0


def skipped(reason: str) -> FigureResult:
    log.info("figure skipped: %s", reason)
    return FigureResult(None, reason)


def problems_of(frame: pd.DataFrame) -> list[tuple]:
    return sorted(frame[["dataset", "model"]].drop_duplicates().itertuples(index=False, name=None))


def problem_label(problem: tuple) -> str:
    dataset, model = problem
    return model if dataset in ("unknown", None) else f"{dataset} / {model}"


def arm_suffix(arm: str) -> str:
    """'<model>/<family>/<variant>[options]' -> '<variant>[options]' (the same across models)."""
    return arm.split("/", 2)[-1] if arm.count("/") >= 2 else arm


def arm_label(family: str, suffix: str) -> str:
    """'sgd (momentum)'; just the family when the variant adds nothing ('default', 'adam')."""
    return family if suffix in ("default", family) else f"{family} ({suffix})"


def arm_styles(frame: pd.DataFrame) -> dict[tuple[str, str], tuple[str, str, str]]:
    """(family, variant suffix) -> (colour, linestyle, label): colour by family, line style by
    variant/options, so one legend entry serves every model."""
    styles = {}
    for family in sorted(frame["family"].unique(), key=family_order):
        part = frame[frame["family"] == family]
        for i, suffix in enumerate(sorted({arm_suffix(a) for a in part["arm"]})):
            label = arm_label(family, suffix)
            styles[(family, suffix)] = (family_color(family), LINESTYLES[i % len(LINESTYLES)],
                                        label)
    return styles


DIVERGED_MARKER = {"marker": "x", "ms": 8, "mew": 2, "ls": "none", "zorder": 5}
DIVERGED_LABEL = "diverged (x)"


def mark_diverged(ax, x, y, colour: str) -> int:
    """An x in the family's colour at each diverged point (every curve figure marks them the
    same way); returns how many points it marked."""
    x, y = np.atleast_1d(np.asarray(x, float)), np.atleast_1d(np.asarray(y, float))
    if len(x):
        ax.plot(x, y, color=colour, label="_diverged", **DIVERGED_MARKER)
    return len(x)


def diverged_handle():
    """The legend entry that explains the x."""
    from matplotlib.lines import Line2D

    return Line2D([], [], color="k", **{k: v for k, v in DIVERGED_MARKER.items()
                                        if k != "zorder"})


def setting_style(styles: dict, row) -> tuple[str, str, bool]:
    """(colour, line style, diverged) of a tuned-setting row of ``tables.best_settings``:
    colour = family, line style = variant (``arm_styles``); diverged when no LR of that
    setting left a result (its row carries the diverged runs, score NaN)."""
    colour, style, _ = styles[(row["family"], arm_suffix(row["arm"]))]
    return colour, style, bool(pd.isna(row.get("score", 0.0)))


def panel_grid(n_rows: int, n_cols: int, panel_h: float = PANEL_H, **kw):
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(PANEL_W * n_cols, panel_h * n_rows),
                             squeeze=False, **kw)
    return fig, axes


def plain_log_ticks(ax, axis: str = "y"):
    """Log-axis ticks as plain numbers ('1.4', not '1.4×10⁰'). Minor ticks are labelled only
    when the axis spans under a decade, and then only 2, 3, 5 × 10ⁿ unless it spans < 3×
    (more would collide)."""
    target = ax.yaxis if axis == "y" else ax.xaxis
    lo, hi = ax.get_ylim() if axis == "y" else ax.get_xlim()
    span = hi / lo if lo > 0 else np.inf

    def minor(value, _):
        mantissa = round(value / 10 ** np.floor(np.log10(value)), 6)
        return f"{value:g}" if span < 3 or mantissa in (2, 3, 5) else ""

    target.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    target.set_minor_formatter(FuncFormatter(minor) if span < 10 else NullFormatter())


def legend_outside(ax):
    """Legend right of the panel, so that it never hides a curve."""
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5), frameon=False)


def save_png(fig, out_dir: Path, name: str) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.png"
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return path


def legend_right(fig, handles, labels):
    fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
