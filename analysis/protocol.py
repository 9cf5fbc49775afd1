"""A fair protocol, checked from the runs themselves: equal tuning budgets, tuned LRs inside
their grids, enough seeds to give intervals, and like compared with like (a momentum baseline
against families without momentum is not). Each check returns plain sentences that open the
report, and the tables here (budgets; each family against the baseline, Welch's t-test) state
what the checks measured, so a reader can see the protocol rather than trust it.
"""
from __future__ import annotations

import math

import pandas as pd

from analysis import stats
from analysis.grid import EDGE
from analysis.tables import best_settings, keys_in, note_table, usable
from analysis.writer import Table
from study import contract as C

BASELINE = "sgd"
MOMENTUM_VARIANTS = ("momentum", "nesterov")
ALPHA = 0.05
BUDGET_KEYS = ("dataset", "model", "batch_size", "family")


def budget_frame(trials: pd.DataFrame) -> pd.DataFrame:
    """Per dataset × model × batch size × family: the distinct settings tried (arms = variants
    × option combinations, times LRs), seeds, trials (every status) and results."""
    keys = keys_in(trials, BUDGET_KEYS)
    if trials.empty or "lr" not in trials:
        return pd.DataFrame(columns=keys + ["n_variants", "n_lr", "n_settings", "n_seeds",
                                           "n_trials", "n_results"])
    seed = "seed" if "seed" in trials else "run_id"
    out = trials.groupby(keys, dropna=False).agg(
        n_variants=("arm", "nunique"), n_lr=("lr", "nunique"), n_seeds=(seed, "nunique"),
        n_trials=("run_id", "size")).reset_index()
    settings = trials.drop_duplicates(keys + ["arm", "lr"]).groupby(keys, dropna=False).size()
    results = usable(trials).groupby(keys, dropna=False).size()
    out = out.merge(settings.rename("n_settings").reset_index(), on=keys, how="left")
    out = out.merge(results.rename("n_results").reset_index(), on=keys, how="left")
    out["n_results"] = out["n_results"].fillna(0).astype(int)
    return out[keys + ["n_variants", "n_lr", "n_settings", "n_seeds", "n_trials", "n_results"]]


def budget_table(trials: pd.DataFrame) -> Table:
    frame = budget_frame(trials)
    return Table("tuning_budget", "Tuning budget per family (settings tried per model × batch "
                 "size)", frame,
                 "n_settings = distinct (variant/options, LR) pairs tried = the tuning budget; "
                 "n_variants counts variants × option combinations; n_trials counts every "
                 "trial (seeds and every status), n_results the finished, stopped and "
                 "diverged ones. Families compared should have equal n_settings.")


def budget_warnings(trials: pd.DataFrame) -> list[str]:
    """One sentence per problem whose families were given different numbers of settings."""
    frame = budget_frame(trials)
    out = []
    for problem, part in frame.groupby(keys_in(frame, ("dataset", "model")), dropna=False):
        unequal_settings = part.groupby("batch_size")["n_settings"].nunique().max() > 1
        unequal_seeds = part.groupby("batch_size")["n_seeds"].nunique().max() > 1
        if not (unequal_settings or unequal_seeds):
            continue
        per = part.groupby("family").agg(lo=("n_settings", "min"), hi=("n_settings", "max"),
                                         seeds=("n_seeds", "max"))
        text = ", ".join(f"{f} {_span(r.lo, r.hi)}" + (f" ({r.seeds} seeds)" if unequal_seeds
                                                        else "") for f, r in per.iterrows())
        out.append(f"Unequal tuning budgets on {_problem(problem)}: {text} settings per batch "
                   "size (LR × variants × options). A family with more settings had more "
                   "chances to look good; compare at equal budgets or say so.")
    return out


def edge_warnings(trials: pd.DataFrame, select: str) -> list[str]:
    """Every family's tuned LR that sits on the edge of its grid: extend the grid."""
    best = best_settings(trials, select)
    out = []
    for _, row in best.iterrows():
        if pd.isna(row["score"]) or not row.get(EDGE):
            continue
        where = {"low": "the smallest", "high": "the largest", "only": "the only"}[row[EDGE]]
        problem = _problem((row["dataset"], row["model"]))
        out.append(f"Grid edge: the tuned LR of {row['family']} on {problem} "
                   f"({row['arm']}, batch {int(row['batch_size'])}) is {row['lr']:.3g}, "
                   f"{where} LR tried: extend the grid "
                   + ("downwards." if row[EDGE] == "low" else "upwards." if row[EDGE] == "high"
                      else "to several LRs."))
    return out


def seed_warnings(trials: pd.DataFrame, select: str) -> list[str]:
    best = best_settings(trials, select)
    best = best[best["score"].notna()]
    if best.empty or best["n_seeds"].max() >= 2:
        return []
    return ["One seed per tuned setting: no confidence interval can be given and no "
            "difference between families can be tested (DeepOBS re-runs the best setting "
            "with 10 seeds). Add seeds to turn the tables into results."]


def _has_momentum(part: pd.DataFrame) -> bool:
    momentum = pd.to_numeric(part.get("opt.momentum", pd.Series(dtype=float)), errors="coerce")
    return bool((momentum.fillna(0) > 0).any() or part["variant"].isin(MOMENTUM_VARIANTS).any())


def momentum_warnings(trials: pd.DataFrame, baseline: str = BASELINE) -> list[str]:
    """Like with like: a momentum baseline against studied families without momentum
    (``opt.momentum`` param, or a momentum/nesterov variant) confounds momentum with the
    method. Adam is a baseline of its own (β1 is its momentum) and is not judged here."""
    if baseline not in set(trials["family"]):
        return []
    base = trials[trials["family"] == baseline]
    if not _has_momentum(base):
        return []
    without = sorted(f for f, part in trials.groupby("family")
                     if f not in (baseline, "adam") and not _has_momentum(part))
    if not without:
        return []
    values = sorted(set(pd.to_numeric(base.get("opt.momentum", pd.Series(dtype=float)),
                                      errors="coerce").dropna()))
    shown = f"momentum {', '.join(f'{v:g}' for v in values)}" if values else "momentum"
    return [f"Like with like: the {baseline} baseline runs with {shown} (variants "
            f"{', '.join(sorted(set(base['variant'])))}) while {', '.join(without)} run "
            f"without momentum. Differences mix the method with momentum; add plain {baseline} "
            "(momentum 0) as a baseline, or give the studied families momentum too."]


def comparison_frame(trials: pd.DataFrame, select: str, baseline: str = BASELINE,
                     metric: str = C.TEST_ACCURACY) -> pd.DataFrame:
    """Each family's tuned setting against the baseline's on the same problem: final
    ``metric`` in percent, difference with its 95% interval and Welch's p-value."""
    best = best_settings(trials, select)
    runs = trials.set_index("run_id")
    rows = []
    for problem, part in best.groupby(keys_in(best, ("dataset", "model")), dropna=False):
        base = part[part["family"] == baseline]
        if base.empty or metric not in runs:
            continue
        b = _values(runs, base.iloc[0], metric)
        for _, row in part[part["family"] != baseline].iterrows():
            a = _values(runs, row, metric)
            est = stats.welch(a, b).scaled(100)
            rows.append({"dataset": problem[0], "model": problem[1], "family": row["family"],
                         "lr": row["lr"], EDGE: row.get(EDGE, ""),
                         f"{metric} (%)": stats.fmt(stats.mean_ci(a).scaled(100)),
                         f"{baseline} (%)": stats.fmt(stats.mean_ci(b).scaled(100)),
                         "difference (pp)": stats.fmt(est), "Welch p": stats.fmt_p(est.p),
                         "result": _result(est, len(a), len(b)),
                         "diff": est.value, "p": est.p})
    return pd.DataFrame(rows)


def comparison_table(trials: pd.DataFrame, select: str, baseline: str = BASELINE) -> Table:
    name, title = "baseline_comparison", (f"Each family against the {baseline} baseline: "
                                          f"final test accuracy, {stats.WELCH}")
    if baseline not in set(trials["family"]):
        return note_table(name, title, f"no {baseline} baseline in this study")
    frame = comparison_frame(trials, select, baseline)
    if frame.empty:
        return note_table(name, title, f"no tuned {baseline} setting to compare against")
    return Table(name, title, frame.drop(columns=["diff", "p"]),
                 f"At each family's tuned setting (selected by {select}); accuracies: "
                 f"{stats.MEAN_CI}; difference = family − {baseline} in percentage points with "
                 f"its 95% Welch interval; p two-sided; significant at p < {ALPHA}. 'No "
                 "significant difference' is a result; with one seed nothing can be tested.")


def protocol_warnings(trials: pd.DataFrame, select: str, baseline: str = BASELINE) -> list[str]:
    """Every protocol check that failed, as sentences for the top of the report."""
    if usable(trials).empty:
        return []
    return (budget_warnings(trials) + edge_warnings(trials, select)
            + seed_warnings(trials, select) + momentum_warnings(trials, baseline))


MIN_MEASUREMENTS = 5


def measurement_warnings(trials: pd.DataFrame, metrics: pd.DataFrame,
                         minimum: int = MIN_MEASUREMENTS) -> list[str]:
    """Result trials whose variance curve rests on fewer than ``minimum`` measurements."""
    key = C.variance_key(C.DIRECTION, "var")
    if metrics.empty or key not in set(metrics["key"]):
        return []
    runs = usable(trials)
    counts = metrics[(metrics["key"] == key) & metrics["run_id"].isin(runs["run_id"])]
    counts = counts.groupby("run_id")["step"].nunique().reindex(runs["run_id"], fill_value=0)
    few = counts[counts < minimum]
    if few.empty:
        return []
    return [f"{len(few)} of {len(counts)} trials have fewer than {minimum} variance "
            f"measurements ({key}; as few as {int(few.min())}): their variance curves rest "
            "on few points. Raise measure.points."]


def _values(runs: pd.DataFrame, row: pd.Series, metric: str) -> list[float]:
    if pd.isna(row["score"]):
        return []
    return [float(v) for v in runs.loc[row["run_ids"], metric] if pd.notna(v)]


def _result(est: stats.Estimate, n_a: int, n_b: int) -> str:
    if n_a == 0 or n_b == 0:
        return "not tested: no tuned setting"
    if n_a < 2 or n_b < 2:
        return "not tested: one seed"
    if math.isnan(est.p) or est.p >= ALPHA:
        return "no significant difference"
    return "significantly " + ("higher" if est.value > 0 else "lower") + f" (p < {ALPHA})"


def _span(lo: int, hi: int) -> str:
    return f"{lo}" if lo == hi else f"{lo}–{hi}"


def _problem(problem) -> str:
    return " / ".join(str(p) for p in problem)
