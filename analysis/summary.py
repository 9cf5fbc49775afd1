"""The study's headline: the best setting of each model × family (``best.csv`` in the report
folder) and, on the MLflow parent run, the metrics ``best/<model>/<family>/<metric>_pct``
(percent, like every accuracy in the report) and a markdown description
(``mlflow.note.content``) that MLflow's UI shows on the run page.

``best_per_family(report_dir)`` reads ``best.csv`` back (the sweep's CLI prints it at the end);
``format_best(frame)`` renders it as a plain-text table for a terminal.
"""
from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pandas as pd

from analysis import selection, tables
from analysis.style import arm_suffix, family_order
from analysis.writer import accuracy_in_percent, format_value, percent_name, to_markdown
from study import contract as C

BEST_FILE = "best.csv"
BEST_METRICS = (C.VAL_ACCURACY, C.TEST_ACCURACY)
BEST_COLUMNS = ("dataset", "model", "family", "variant", "arm", "lr", "edge", "batch_size",
                *map(percent_name, BEST_METRICS), "n_seeds")
PERCENT_SUFFIX = "_pct"   # the parent run's best/... metrics are percent; MLflow names allow no %
_MAX_NOTE = 8000  # mlflow.utils.validation.MAX_TAG_VAL_LENGTH
_UNTUNED = ("variant", "arm", "lr", "batch_size", *BEST_METRICS)  # blank without a tuned setting


def best_frame(trials: pd.DataFrame, select: str = C.VAL_ACCURACY) -> pd.DataFrame:
    """One row per dataset × model × family: the tuned setting (``tables.best_settings``) and
    its seed-mean val and test accuracy. A family with no tuned setting (every LR diverged, or
    no result at all) keeps its row with the setting and accuracies blank and n_seeds 0."""
    best = tables.best_settings(trials, select)
    names = [*BEST_COLUMNS[:-3], *BEST_METRICS, "n_seeds"]
    out = pd.DataFrame({col: best[col] if col in best else np.nan for col in names},
                       index=best.index)
    untuned = best["score"].isna().to_numpy()
    out[list(_UNTUNED)] = out[list(_UNTUNED)].astype(object)
    out.loc[untuned, list(_UNTUNED)] = np.nan
    out.loc[untuned, "n_seeds"] = 0
    out["batch_size"] = pd.to_numeric(out["batch_size"], errors="coerce").astype("Int64")
    out["n_seeds"] = pd.to_numeric(out["n_seeds"], errors="coerce").fillna(0).astype(int)
    for col in ("lr", *BEST_METRICS):
        out[col] = pd.to_numeric(out[col], errors="coerce")
    order = sorted(range(len(out)), key=lambda i: (str(out["dataset"].iat[i]),
                                                   str(out["model"].iat[i]),
                                                   family_order(str(out["family"].iat[i]))))
    return accuracy_in_percent(out.iloc[order].reset_index(drop=True))


def write_best(frame: pd.DataFrame, out_dir: Path) -> Path:
    path = Path(out_dir) / BEST_FILE
    frame.to_csv(path, index=False)
    return path


def best_per_family(report_dir: str | Path) -> pd.DataFrame:
    """The report's ``best.csv``: the tuned setting of each model × family, columns
    ``BEST_COLUMNS`` (accuracies in percent; NaN where a family has no tuned setting)."""
    frame = pd.read_csv(Path(report_dir) / BEST_FILE)
    frame["batch_size"] = frame["batch_size"].astype("Int64")
    return frame


def format_best(frame: pd.DataFrame) -> str:
    """A fixed-width text table of ``best_per_family`` for a terminal (accuracies in %)."""
    rows = [("model", "family", "variant", "lr", "batch", "val %", "test %", "seeds")]
    val, test = map(percent_name, BEST_METRICS)
    for _, r in frame.iterrows():
        rows.append((str(r["model"]), str(r["family"]), _variant(r), format_value(r["lr"]),
                     format_value(r["batch_size"]), _pct(r[val]), _pct(r[test]),
                     str(r["n_seeds"])))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip()
                     for row in rows)


def _pct(value) -> str:
    return "–" if value is None or pd.isna(value) else f"{value:.1f}"


def _variant(row) -> str:
    """The variant, or the arm's variant+options suffix when the options distinguish it."""
    if pd.isna(row["variant"]):
        return "–"
    return arm_suffix(row["arm"]) if isinstance(row["arm"], str) else str(row["variant"])


_METRIC_NAME = re.compile(r"[^A-Za-z0-9_\-. /]")


def best_metrics(frame: pd.DataFrame) -> dict[str, float]:
    """``best/<model>/<family>/<metric>_pct`` -> seed mean (%) at the tuned setting (finite
    values only). A study has one dataset; with several, the key carries it:
    best/<dataset>/..."""
    several = frame["dataset"].nunique() > 1
    out = {}
    for _, r in frame.iterrows():
        parts = ([str(r["dataset"])] if several else []) + [str(r["model"]), str(r["family"])]
        for metric in BEST_METRICS:
            value = r[percent_name(metric)]
            if value is not None and not pd.isna(value) and math.isfinite(value):
                key = C.BEST_PREFIX + "/".join(_METRIC_NAME.sub("_", p) for p in parts)
                out[f"{key}/{metric}{PERCENT_SUFFIX}"] = float(value)
    return out


def status_line(trials: pd.DataFrame) -> str:
    """'56 trials: 52 finished, 2 diverged, 2 errored' (the contract's order)."""
    counts = trials["status"].value_counts()
    order = [s for s in C.STATUSES if s in counts] + sorted(set(counts.index) - set(C.STATUSES))
    parts = ", ".join(f"{counts[s]} {s}" for s in order)
    return f"{len(trials)} trials" + (f": {parts}" if parts else "")


def description(study: str, trials: pd.DataFrame, best: pd.DataFrame, select: str) -> str:
    """The parent run's markdown description: study, dataset, trials by status, best table."""
    datasets = ", ".join(sorted(map(str, trials["dataset"].dropna().unique()))) or "unknown"
    lines = [f"**Study `{study}`** on **{datasets}**", "", f"{status_line(trials)}.", "",
             f"Best setting of each model × family (by {selection.describe(select)}, seed "
             "means); the full "
             f"report is the artifact `{C.REPORT_DIR}/index.html`.", ""]
    if best.empty:
        return "\n".join(lines + ["No trial is a result (none finished, stopped or diverged)."])
    table = pd.DataFrame({
        "model": best["model"], "family": best["family"],
        "variant": [_variant(r) for _, r in best.iterrows()],
        "lr": best["lr"], "batch size": best["batch_size"],
        "val acc (%)": [_pct(v) for v in best[percent_name(C.VAL_ACCURACY)]],
        "test acc (%)": [_pct(v) for v in best[percent_name(C.TEST_ACCURACY)]],
        "seeds": best["n_seeds"]})
    return "\n".join(lines) + "\n" + to_markdown(table)


def log_summary(tracking_uri: str | None, parent_run_id: str, metrics: dict[str, float],
                note: str, tags: dict[str, str] | None = None) -> None:
    """Log the best metrics (step 0), the description and ``tags`` (claim verdicts) on the
    study's parent run."""
    import time

    from mlflow import MlflowClient
    from mlflow.entities import Metric, RunTag

    if len(note) > _MAX_NOTE:  # MLflow's limit on a tag value: cut at a line, say where the rest is
        note = note[:note.rfind("\n", 0, _MAX_NOTE - 100)] + (
            f"\n\n… (cut; every row is in `{C.REPORT_DIR}/{BEST_FILE}`)")
    client = MlflowClient(tracking_uri=tracking_uri)
    now = int(time.time() * 1000)
    entries = [Metric(k, v, now, 0) for k, v in metrics.items()]
    for i in range(0, max(len(entries), 1), 1000):  # log_batch takes at most 1000 metrics
        first = [RunTag(C.TAG_NOTE, note)] + [RunTag(k, v) for k, v in (tags or {}).items()]
        client.log_batch(parent_run_id, metrics=entries[i:i + 1000],
                         tags=first if i == 0 else [])
