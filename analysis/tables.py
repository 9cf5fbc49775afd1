"""Result tables: best LR, final accuracy ± seeds, tuneability, cost to target, trial counts,
critical batch size. Every function takes the frames of ``analysis.load`` and returns a
``Table`` (written by ``analysis.writer``); missing inputs give a table that says so.

Conventions: accuracies are fractions in [0, 1] as logged, and percent (one decimal, columns
named '... (%)') in every table a reader sees (``writer.accuracy_in_percent``); the results
are the trials whose status is one of ``contract.RESULT_STATUSES``: finished, stopped early
by the scheduler (its final metrics are those of its last epoch) and diverged (its score is
NaN, so a setting where any seed diverged is never selected). Errored, interrupted and
still-running trials are not results and are left out of every statistic except the counts.
Every table survives a study with no result left (it then says so).
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from analysis import selection, stats
from analysis.grid import EDGE, with_edge
from analysis.writer import Table, accuracy_in_percent
from study import contract as C

SETTING_KEYS = ("dataset", "model", "family", "variant", "arm", "batch_size")
PROBLEM_KEYS = ("dataset", "model")
REPORTED = (C.TEST_ACCURACY, C.VAL_ACCURACY, C.TRAIN_LOSS, C.GRAD_EVALS, C.TIME_S)
STATUSES = C.STATUSES


def keys_in(frame: pd.DataFrame, keys) -> list[str]:
    return [k for k in keys if k in frame.columns]


def drop_redundant_arm(frame: pd.DataFrame) -> pd.DataFrame:
    """'arm' only adds information when family options vary (it then carries a suffix)."""
    if {"arm", "model", "family", "variant"} <= set(frame.columns):
        plain = frame["model"] + "/" + frame["family"] + "/" + frame["variant"]
        if (frame["arm"] == plain).all():
            return frame.drop(columns=["arm"])
    return frame


def note_table(name: str, title: str, note: str) -> Table:
    return Table(name, title, pd.DataFrame({"note": [note]}), note)


def resolve_select(trials: pd.DataFrame, select: str) -> str:
    """The selection (``analysis.selection``), falling back to test accuracy when the study
    had no val split."""
    selection.check(select)
    if select in trials.columns and trials[select].notna().any():
        return select
    if not _has_metrics(usable(trials)):  # nothing to select from: the tables say so
        return select
    if select == C.VAL_ACCURACY and C.TEST_ACCURACY in trials.columns:
        return C.TEST_ACCURACY
    raise ValueError(f"select={select!r}: no trial logged that metric")


def usable(trials: pd.DataFrame) -> pd.DataFrame:
    """The trials whose numbers are results (finished, stopped early, diverged)."""
    return trials[trials["status"].isin(C.RESULT_STATUSES)]


def _has_metrics(frame: pd.DataFrame) -> bool:
    return any(m in frame.columns and frame[m].notna().any()
               for m in (*selection.SELECTIONS, C.TEST_LOSS))


def aggregate_settings(trials: pd.DataFrame, select: str) -> pd.DataFrame:
    """One row per setting × LR: the seed-mean of the score and of the reported metrics."""
    select = resolve_select(trials, select)
    keys = keys_in(trials, SETTING_KEYS) + ["lr"]
    df = usable(trials).copy()
    score = df[select] if select in df.columns else pd.Series(np.nan, index=df.index)
    df["score"] = score.astype(float).where(df["status"] != C.DIVERGED)
    df["is_diverged"] = (df["status"] == C.DIVERGED).astype(int)
    agg = {"score": lambda s: s.mean(skipna=False), "is_diverged": "sum", "run_id": list}
    agg.update({m: "mean" for m in keys_in(df, REPORTED)})
    out = df.groupby(keys, dropna=False).agg(agg).reset_index()
    out["n_seeds"] = out["run_id"].map(len)
    out = out.rename(columns={"is_diverged": "n_diverged", "run_id": "run_ids"})
    out.attrs["select"] = select
    return out


def _pick(settings: pd.DataFrame, by: list[str], select: str) -> pd.DataFrame:
    """Best row of each group (max or min score); groups whose every score is NaN keep their
    first row with NaN best so that they are still listed."""
    ascending = selection.mode(select) == "min"
    ordered = settings.sort_values(by + ["score", "lr"], ascending=[True] * len(by) + [
        ascending, True], na_position="last", kind="mergesort")
    return ordered.groupby(by, dropna=False, sort=True).head(1).reset_index(drop=True)


def best_settings(trials: pd.DataFrame, select: str = C.VAL_ACCURACY,
                  by=("dataset", "model", "family")) -> pd.DataFrame:
    """The tuned setting (variant, batch size, LR) of each family on each problem, with the
    ``edge`` of its LR grid it sits on ("low", "high", "only" or "")."""
    settings = aggregate_settings(trials, select)
    best = _pick(settings, keys_in(settings, by), settings.attrs["select"])
    best = with_edge(best, trials)
    best.loc[best["score"].isna(), EDGE] = ""
    return best


def best_lr_table(trials: pd.DataFrame, select: str = C.VAL_ACCURACY) -> Table:
    settings = aggregate_settings(trials, select)
    select = settings.attrs["select"]
    groups = keys_in(settings, SETTING_KEYS)
    best = _pick(settings, groups, select)
    grid = settings.groupby(groups, dropna=False).agg(
        n_lr=("lr", "nunique"), n_diverged=("n_diverged", "sum")).reset_index()
    best = best.drop(columns=["n_diverged"]).merge(grid, on=groups)
    best["best_lr"] = best["lr"].where(best["score"].notna())
    best = with_edge(best, trials, "best_lr")
    cols = groups + ["best_lr", EDGE] + keys_in(best, REPORTED) + ["n_seeds", "n_lr",
                                                                   "n_diverged"]
    rule = selection.describe(select)
    return Table("best_lr", f"Best learning rate per setting (selected by {rule})",
                 drop_redundant_arm(accuracy_in_percent(best[cols])),
                 "Seed means at the selected LR (a setting where any seed diverged is never "
                 "selected); best_lr is '–' when every LR diverged. edge: the best LR is the "
                 "lowest ('low') or highest ('high') LR tried, or the only one: extend the grid.")


def final_accuracy_long(trials: pd.DataFrame, select: str = C.VAL_ACCURACY) -> pd.DataFrame:
    """Final test accuracy of each family at its tuned setting: mean, std (ddof=1), the
    95% t-interval over seeds (``analysis.stats.mean_ci``), n seeds and the grid edge."""
    best = best_settings(trials, select)
    runs = trials.set_index("run_id")
    names = keys_in(best, PROBLEM_KEYS + ("family", "variant", "arm", "batch_size", "lr",
                                         EDGE))
    rows = []
    for _, row in best.iterrows():
        tuned = pd.notna(row["score"]) and C.TEST_ACCURACY in runs  # NaN: every LR diverged
        acc = runs.loc[row["run_ids"], C.TEST_ACCURACY].dropna() if tuned else []
        est = stats.mean_ci(acc)
        rows.append({**{k: row[k] for k in names}, "mean": est.value,
                     "std": float(np.std(acc, ddof=1)) if len(acc) > 1 else np.nan,
                     "ci_low": est.low, "ci_high": est.high, "n_seeds": len(acc)})
    return pd.DataFrame(rows, columns=names + ["mean", "std", "ci_low", "ci_high", "n_seeds"])


FINAL_COLUMN = "test accuracy (%): mean ± 95% CI"


def final_accuracy_table(trials: pd.DataFrame, select: str = C.VAL_ACCURACY) -> Table:
    if C.TEST_ACCURACY not in trials.columns:
        return note_table("final_test_accuracy", "Final test accuracy",
                          "no test_accuracy metric was logged")
    long = final_accuracy_long(trials, select)
    if long.empty:
        return note_table("final_test_accuracy", "Final test accuracy",
                          "no trial is a result (every trial errored, was interrupted or is "
                          "still running)")
    long[FINAL_COLUMN] = [
        stats.fmt(stats.Estimate(m, lo, hi, n, note=stats.NO_CI).scaled(100))
        for m, lo, hi, n in zip(long["mean"], long["ci_low"], long["ci_high"], long["n_seeds"])]
    cols = [c for c in long.columns if c not in ("mean", "std", "ci_low", "ci_high")]
    cols.remove("n_seeds")
    return Table("final_test_accuracy", "Final test accuracy (%) at each family's tuned setting",
                 drop_redundant_arm(long[cols + ["n_seeds"]]),
                 f"{stats.MEAN_CI} (two-sided 95% t-interval, df = n−1) at the setting "
                 f"selected by {resolve_select(trials, select)}; 'no CI' with one seed. edge: "
                 "the tuned LR is on the edge of its grid.")


TUNEABILITY_BUDGETS = (1, 2, 4)
TUNEABILITY_SOURCE = ("Sivaprasad et al. 2020, 'Optimizer benchmarking needs to account for "
                      "hyperparameter tuning'")


def tuneability_frame(trials: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Per setting (problem × family/variant × batch size): the expected best seed-mean
    ``metric`` (%) a random search of k LRs drawn from the grid without replacement finds, for
    k in ``TUNEABILITY_BUDGETS`` (k = 1: the grid's mean), the best of the whole grid, and the
    mean over every budget k = 1..n (ω-tunability with equal weights). A diverged LR scores
    0 (DeepOBS's LR-sensitivity plot sets NaN to 0): an optimizer that diverges on part of its
    grid is harder to tune."""
    settings = aggregate_settings(trials, metric)
    groups = keys_in(settings, SETTING_KEYS)
    rows = []
    for key, part in settings.groupby(groups, dropna=False):
        scores = 100 * part["score"].fillna(0.0).to_numpy(float)
        n = len(scores)
        row = {**dict(zip(groups, key)), "n_lr": n,
               "n_lr_diverged": int((part["n_diverged"] > 0).sum())}
        for k in TUNEABILITY_BUDGETS:
            row[f"best of {k} (%)"] = (stats.expected_best_of_draws(scores, k)
                                       if k <= n else np.nan)
        row["best of grid (%)"] = float(scores.max())
        row["mean over budgets (%)"] = float(np.mean(
            [stats.expected_best_of_draws(scores, k) for k in range(1, n + 1)]))
        rows.append(row)
    return pd.DataFrame(rows)


def tuneability_table(trials: pd.DataFrame, metric: str | None = None) -> Table:
    metric = metric or next((m for m in (C.VAL_ACCURACY, C.TEST_ACCURACY)
                             if m in trials.columns and trials[m].notna().any()), None)
    if metric is None or metric not in trials.columns:
        return note_table("tuneability", "Tuneability", "no accuracy metric was logged")
    frame = tuneability_frame(trials, metric)
    if frame.empty:
        return note_table("tuneability", "Tuneability", "no trial is a result")
    return Table("tuneability", f"Tuneability: expected best final {metric} (%) after k "
                 f"random LRs from the grid ({TUNEABILITY_SOURCE})",
                 drop_redundant_arm(frame.round(1)),
                 "best of k = E[max of k LRs drawn without replacement from the grid] of the "
                 "seed-mean score (k = 1: the grid's mean; '–' where the grid has fewer LRs); "
                 "mean over budgets = the mean of best of k over k = 1..n (ω-tunability, "
                 "equal weights). A diverged LR (any seed) scores 0. DeepOBS itself reports "
                 "no tuneability number (its table lists the tuned setting; the LR-sensitivity "
                 "figure shows the rest). Trials that are not results are left out of the grid.")


def _first_reach(history: pd.DataFrame, metric: str, target: float) -> pd.DataFrame:
    """Per run: grad_evals and time_s at the first logged step where ``metric`` ≥ target."""
    wide = history[history["key"].isin([metric, C.GRAD_EVALS, C.TIME_S])].pivot_table(
        index=["run_id", "step"], columns="key", values="value", aggfunc="last").reset_index()
    for col in (C.GRAD_EVALS, C.TIME_S, metric):
        if col not in wide:
            wide[col] = np.nan
    hit = wide[wide[metric] >= target].sort_values("step").groupby("run_id").head(1)
    out = pd.DataFrame({"run_id": history["run_id"].unique()})
    out = out.merge(hit[["run_id", "step", C.GRAD_EVALS, C.TIME_S]], on="run_id", how="left")
    return out.fillna({C.GRAD_EVALS: np.inf, C.TIME_S: np.inf, "step": np.inf})


def cost_to_target_frame(trials, metrics, select=C.VAL_ACCURACY, metric=C.VAL_ACCURACY,
                         target_fraction=0.9, target=None) -> pd.DataFrame:
    """AlgoPerf time-to-target per problem × family: at the tuned setting (median over seeds,
    a seed that misses counts as ∞) and the fastest trial anywhere in the family's grid. The
    target is set and reached on validation data (AlgoPerf's targets are validation targets):
    a test metric is refused, since choosing on test data leaks it into the result."""
    if metric.startswith("test_"):
        raise ValueError(f"cost to target on {metric}: targets are set on validation (or "
                         "training) metrics, never on test data")
    if metrics.empty or metric not in set(metrics["key"]):
        return pd.DataFrame()
    problems = keys_in(trials, PROBLEM_KEYS)
    best = best_settings(trials, select)
    hist = metrics.merge(trials[["run_id", "status"] + problems + ["family"]], on="run_id")
    hist = hist[hist["status"].isin(C.RESULT_STATUSES)]
    rows = []
    for problem, part in hist.groupby(problems):
        reached = part.loc[part["key"] == metric, "value"].max()
        goal = target if target is not None else target_fraction * reached
        firsts = _first_reach(part, metric, goal).merge(
            trials[["run_id", "family"]], on="run_id")
        firsts = firsts.set_index("run_id")
        sel = best
        for key, value in zip(problems, problem):
            sel = sel[sel[key] == value]
        for _, setting in sel.iterrows():
            mine = firsts.loc[[r for r in setting["run_ids"] if r in firsts.index]]
            family_runs = firsts[firsts["family"] == setting["family"]]
            rows.append({**dict(zip(problems, problem)), "family": setting["family"],
                         "variant": setting.get("variant", "default"),
                         "arm": setting["arm"], "batch_size": setting["batch_size"],
                         "lr": setting["lr"], EDGE: setting.get(EDGE, ""), "target": goal,
                         "reached": f"{int(np.isfinite(mine['grad_evals']).sum())}/{len(mine)}",
                         "grad_evals_to_target": float(np.median(mine[C.GRAD_EVALS]))
                         if len(mine) else np.inf,
                         "time_s_to_target": float(np.median(mine[C.TIME_S]))
                         if len(mine) else np.inf,
                         "fastest_grad_evals_in_grid": float(family_runs[C.GRAD_EVALS].min()),
                         "fastest_time_s_in_grid": float(family_runs[C.TIME_S].min())})
    return pd.DataFrame(rows)


def cost_to_target_table(trials, metrics, select=C.VAL_ACCURACY, metric=C.VAL_ACCURACY,
                         target_fraction=0.9, target=None) -> Table:
    frame = cost_to_target_frame(trials, metrics, select, metric, target_fraction, target)
    if frame.empty:
        return note_table("cost_to_target", "Cost to reach the target",
                          f"no {metric} history of a finished, stopped or diverged trial "
                          "(targets are set on validation data, never on test data)")
    shown = accuracy_in_percent(frame.rename(columns={"target": f"target {metric}"}))
    if metric.endswith("accuracy"):
        target_text = f"{100 * target:.1f}%" if target is not None else None
    else:
        target_text = f"{target:g}" if target is not None else None
    goal = target_text or f"{target_fraction:g} × the best {metric} any trial reached"
    return Table("cost_to_target", f"Cost to reach {metric} ≥ target ({goal})",
                 drop_redundant_arm(shown),
                 "Gradient evaluations (examples through a backward, incl. periodic work) and "
                 "wall seconds at the first logged step reaching the target; median over seeds "
                 "at the tuned setting ('not reached' = ∞), and the fastest trial in the grid.")


def status_counts_table(trials: pd.DataFrame) -> Table:
    counts = status_counts(trials, by="family")
    return Table("trial_counts", "Trials per family by status", counts.reset_index(),
                 "stopped = stopped early by the scheduler (a result, with fewer epochs); "
                 "diverged = loss became non-finite (a result); errored = the trial crashed; "
                 "interrupted = the sweep was interrupted (it continues on resume); running = "
                 "still training when the store was read. Only finished, stopped and diverged "
                 "trials enter the other tables.")


def status_counts(trials: pd.DataFrame, by: str = "family") -> pd.DataFrame:
    """Trials per ``by`` × status: the contract's statuses in order, any other after them,
    then the total."""
    counts = pd.crosstab(trials[by], trials["status"]) if len(trials) else pd.DataFrame(
        index=pd.Index([], name=by))
    extra = [c for c in counts.columns if c not in STATUSES]
    counts = counts.reindex(columns=list(STATUSES) + extra, fill_value=0).astype(int)
    counts.columns.name = None
    counts["total"] = counts.sum(axis=1)
    return counts


def critical_batch_table(trials, metrics, select=C.VAL_ACCURACY,
                         key=C.NOISE_SCALE) -> Table:
    """Measured B_simple (McCandlish et al.) beside the best batch size the grid found."""
    title = "Critical batch size: measured noise scale B_simple vs the grid's best batch size"
    if metrics.empty or key not in set(metrics["key"]):
        return note_table("critical_batch_size", title,
                          f"no {key} metrics were recorded in this study")
    problems = keys_in(trials, PROBLEM_KEYS)
    best = best_settings(trials, select)
    ok = trials[trials["status"].isin(set(C.RESULT_STATUSES) - {C.DIVERGED})]
    noise = _mark_capped(metrics[metrics["run_id"].isin(ok["run_id"])], key)
    noise = noise.merge(trials[["run_id", "family"] + problems], on="run_id")
    capped = noise[noise["at_cap"]]
    noise = noise[~noise["at_cap"]]   # at the cap: a bound, not a measurement
    rows = []
    for _, setting in best.iterrows():
        mine = noise[noise["run_id"].isin(setting["run_ids"])]["value"]
        n_capped = int(capped["run_id"].isin(setting["run_ids"]).sum())
        fam = noise
        for col in problems + ["family"]:
            fam = fam[fam[col] == setting[col]]
        grid = sorted(trials.loc[trials["family"] == setting["family"], "batch_size"].dropna()
                      .astype(int).unique())
        rows.append({**{c: setting[c] for c in problems}, "family": setting["family"],
                     "b_simple_pooled_tuned": _pooled_noise_scale(metrics, setting["run_ids"]),
                     "b_simple_median_tuned": mine.median() if len(mine) else np.nan,
                     "b_simple_q25_tuned": mine.quantile(0.25) if len(mine) else np.nan,
                     "b_simple_q75_tuned": mine.quantile(0.75) if len(mine) else np.nan,
                     "n_at_cap_tuned": n_capped,
                     "b_simple_median_all_runs": fam["value"].median(),
                     "n_measurements": len(fam),
                     "best_batch_size": setting["batch_size"] if pd.notna(setting["score"])
                     else np.nan, "lr": setting["lr"], EDGE: setting.get(EDGE, ""),
                     "batch_size_grid": " ".join(str(b) for b in grid)})
    if not rows:
        return note_table("critical_batch_size", title, "no trial is a result")
    return Table("critical_batch_size", title, pd.DataFrame(rows),
                 "b_simple_pooled_tuned = mean tr(Σ) / mean |G|² over every measurement of "
                 "the tuned setting (McCandlish et al. average numerator and denominator "
                 "before the ratio; 'inf' = the mean unbiased |G|² estimate is not positive, "
                 "noise swamps the signal): this is the measurement. The medians (IQR beside "
                 "them; also over all non-diverged runs of the family) are of the "
                 "per-measurement var/noise_scale, which cannot exceed the examples one "
                 "measurement uses (var/noise_examples): measurements at that cap are bounds, "
                 "not values, and are left out (n_at_cap_tuned counts them).")


def _mark_capped(metrics: pd.DataFrame, key: str) -> pd.DataFrame:
    """The ``key`` measurements with ``at_cap``: the value sits at the probe's example count
    (``var/noise_examples`` at the same step), where B_simple saturates."""
    noise = metrics[metrics["key"] == key]
    cap = metrics[metrics["key"] == C.NOISE_EXAMPLES][["run_id", "step", "value"]]
    noise = noise.merge(cap.rename(columns={"value": "cap"}), on=["run_id", "step"], how="left")
    noise["at_cap"] = noise["cap"].notna() & (noise["value"] >= noise["cap"] * (1 - 1e-9))
    return noise


def _pooled_noise_scale(metrics, run_ids) -> float:
    mine = metrics[metrics["run_id"].isin(run_ids)]
    trace = mine.loc[mine["key"] == C.TRACE_SIGMA, "value"]
    grad_sq = mine.loc[mine["key"] == C.GRAD_SQ_UNBIASED, "value"]
    if trace.empty or grad_sq.empty:
        return np.nan
    return float(trace.mean() / grad_sq.mean()) if grad_sq.mean() > 0 else np.inf


def all_tables(trials, metrics, select=C.VAL_ACCURACY, target_fraction=0.9,
               target_metric=C.VAL_ACCURACY) -> list[Table]:
    return [best_lr_table(trials, select), final_accuracy_table(trials, select),
            tuneability_table(trials),
            cost_to_target_table(trials, metrics, select, target_metric, target_fraction),
            status_counts_table(trials), critical_batch_table(trials, metrics, select)]
