"""AlgoPerf performance profiles (Dolan & Moré 2002): for each family, the share ρ(τ) of
problems on which its cost to the target is within a factor τ of the best family's."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from analysis.style import (
    PANEL_H,
    FigureResult,
    family_color,
    family_order,
    panel_grid,
    save_png,
    skipped,
)

# A profile is a statement about a set of problems: ρ(τ) moves in steps of 1/P, so with P < 5
# every step is at least a quarter of the curve, one problem decides a family's score and a
# reader sees ties and jumps rather than a distribution. AlgoPerf scores over 8 workloads;
# 5 is the fewest at which a single problem moves ρ by no more than 20%.
MIN_PROFILE_PROBLEMS = 5


def profile_curve(costs: pd.DataFrame, taus: np.ndarray) -> dict[str, np.ndarray]:
    """ρ_s(τ): share of problems on which family s is within factor τ of the best family.
    ``costs``: rows = problems, columns = families, ∞/NaN = target not reached."""
    costs = costs.astype(float).fillna(np.inf)
    best = costs.min(axis=1)
    ratios = costs.div(best, axis=0).where(np.isfinite(best), np.inf, axis=0)
    return {fam: np.array([(ratios[fam] <= t).mean() for t in taus]) for fam in costs.columns}


def profile_score(rho: np.ndarray, taus: np.ndarray) -> float:
    """AlgoPerf score: the normalised area under ρ(τ) from 1 to r_max."""
    return float(np.trapezoid(rho, taus) / (taus[-1] - taus[0]))


def performance_profiles(cost: pd.DataFrame, out_dir: Path, r_max: float = 4.0) -> FigureResult:
    """AlgoPerf performance profiles over problems (dataset × model) of the cost to reach the
    target, in gradient evaluations and in seconds, at each family's tuned setting."""
    if cost.empty:
        return skipped("no cost-to-target data")
    cost = cost.assign(problem=cost["dataset"].astype(str) + "/" + cost["model"].astype(str))
    n_problems = cost["problem"].nunique()
    if n_problems < MIN_PROFILE_PROBLEMS:
        return skipped(f"performance profiles need at least {MIN_PROFILE_PROBLEMS} problems "
                       f"(dataset × model); this study has {n_problems}: ρ(τ) would move in "
                       f"steps of 1/{n_problems} and one problem would decide a family's score")
    taus = np.linspace(1.0, r_max, 301)
    fig, axes = panel_grid(1, 2, panel_h=PANEL_H + 1.0, layout="constrained")
    n_series = 0
    for ax, col, unit in ((axes[0, 0], "grad_evals_to_target", "gradient evaluations"),
                          (axes[0, 1], "time_s_to_target", "wall-clock seconds")):
        table = cost.pivot_table(index="problem", columns="family", values=col, aggfunc="min")
        table = table[sorted(table.columns, key=family_order)]
        curves = profile_curve(table, taus)
        for k, (fam, rho) in enumerate(curves.items()):
            width = 3.5 - 2.3 * k / max(1, len(curves) - 1)  # wide first: tied curves stay visible
            ax.step(taus, rho, where="post", color=family_color(fam), lw=width,
                    label=f"{fam} (score {profile_score(rho, taus):.2f})")
            n_series += 1
        ax.set_xlim(1, r_max)
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("τ: cost ratio to the best family")
        ax.set_ylabel("ρ(τ): share of problems within τ of best")
        ax.set_title(f"cost to target in {unit}\n({table.shape[0]} problems)", fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2,
                  frameon=False)  # below the axes: ρ curves fill the panel
    return FigureResult(save_png(fig, Path(out_dir), "performance_profiles"), n_panels=2,
                        n_series=n_series)
