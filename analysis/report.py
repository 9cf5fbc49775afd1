"""One study -> ``reports/<study>/``: tables (CSV/Markdown/LaTeX), figures (PNG), ``index.md``,
``index.html`` and the sweep's first report ``summary.md``/``summary.csv``; the folder is also
logged under ``report/`` on the study's MLflow parent run so ``mlflow ui`` shows it.
"""
from __future__ import annotations

import html
import logging
import os
import tempfile
from pathlib import Path

import pandas as pd

from analysis import figures, tables

# One artifact download per trial: MLflow's per-download progress bars would flood the sweep.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
from analysis.load import StudyNotFoundError, download_grad_hist, load_mlflow, load_tune
from analysis.writer import Table, to_html, to_markdown, write_table

log = logging.getLogger(__name__)

SUMMARY_COLUMNS = ("dataset", "model", "family", "variant", "batch_size", "best_lr",
                   "test_accuracy", "train_loss", "n_diverged")
FIGURE_CAPTIONS = {
    "lr_sensitivity": "Final test accuracy vs learning rate (seed mean ± std; x = diverged).",
    "lr_bs_heatmaps": "Final test accuracy (%) over the LR × batch-size grid, per family.",
    "learning_curves": "Learning curves per unit of work at each family's tuned setting.",
    "variance": "Variance and normalized variance of each family's step direction "
                "(Faghri et al.).",
    "grad_histograms": "Histograms of |gradient entries| over training (log-log).",
    "performance_profiles": "Performance profiles of the cost to reach the target (AlgoPerf).",
}


def _resolve_source(study, tracking_uri, results_dir):
    """Where to read from: an explicit argument, else $MLFLOW_TRACKING_URI, else a local
    ``mlflow.db``, else Tune's ``./results/<study>``."""
    if tracking_uri or results_dir:
        return tracking_uri, results_dir
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env, None
    if Path("mlflow.db").exists():
        return f"sqlite:///{Path('mlflow.db').resolve()}", None
    return None, Path("results") / study


def _tune_folder(results_dir: Path, study: str) -> Path:
    """Accept the storage root (``results/``) as well as the study folder."""
    results_dir = Path(results_dir)
    if not any(results_dir.glob("*/result.json")) and (results_dir / study).is_dir():
        return results_dir / study
    return results_dir


def _missing_sqlite(uri: str) -> bool:
    """Opening a sqlite URI creates the file; never leave an empty store behind."""
    return uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).exists()


def load_study(study, tracking_uri=None, results_dir=None, parent_run_id=None):
    """MLflow first (it has variance metrics and histograms), Tune's results as fallback."""
    tracking_uri, results_dir = _resolve_source(study, tracking_uri, results_dir)
    if tracking_uri and not (results_dir and _missing_sqlite(tracking_uri)):
        try:
            return load_mlflow(study, tracking_uri, parent_run_id)
        except StudyNotFoundError:
            if results_dir is None:
                raise
            log.warning("study %r not in MLflow at %s; reading Tune results", study, tracking_uri)
    return load_tune(_tune_folder(results_dir, study))


def _grad_hists(trials, best) -> dict[tuple, dict]:
    """grad_hist.json of one seed of each family's tuned setting (MLflow stores only)."""
    uri = trials.attrs.get("tracking_uri")
    if trials.attrs.get("source") != "mlflow":
        return {}
    found = {}
    with tempfile.TemporaryDirectory() as tmp:
        for _, row in best.iterrows():
            for run_id in row["run_ids"][:3]:
                hist = download_grad_hist(uri, run_id, Path(tmp) / run_id)
                if hist:
                    label = figures.arm_label(row["family"], figures.arm_suffix(row["arm"]))
                    found[(row["dataset"], row["model"], row["family"], label)] = hist
                    break
    return found


def summary_frame(best_lr: pd.DataFrame) -> pd.DataFrame:
    return best_lr[[c for c in SUMMARY_COLUMNS if c in best_lr.columns]]


def make_figures(trials, metrics, best, cost, out_dir: Path) -> dict[str, figures.FigureResult]:
    out_dir = Path(out_dir)
    results = {
        "lr_sensitivity": figures.lr_sensitivity(trials, out_dir),
        "lr_bs_heatmaps": figures.lr_bs_heatmaps(trials, out_dir),
        "learning_curves": figures.learning_curves(metrics, best, out_dir),
        "variance": figures.variance_curves(metrics, best, out_dir),
        "grad_histograms": figures.grad_histograms(_grad_hists(trials, best), out_dir),
        "performance_profiles": figures.performance_profiles(cost, out_dir),
    }
    return results


def _source_line(trials, quote: str = "`") -> str:
    attrs = trials.attrs
    if attrs.get("source") == "mlflow":
        return (f"MLflow {attrs.get('tracking_uri') or '(default URI)'}, parent run "
                f"{quote}{attrs.get('parent_run_id')}{quote}")
    return f"Ray Tune results {quote}{attrs.get('results_dir')}{quote}"


def _write_index_md(out, study, trials, select, summary, table_list, figs):
    lines = [f"# Study `{study}`", "",
             (f"Source: {_source_line(trials)}. Trials: {len(trials)}. "
              f"Best LR selected by final `{select}`."), "",
             "## Summary (best LR per model × family × batch size)", "",
             "[summary.csv](summary.csv) · [summary.md](summary.md)", "", to_markdown(summary)]
    for table in table_list:
        links = " · ".join(f"[{k}]({p.relative_to(out).as_posix()})"
                           for k, p in table.paths.items())
        lines += [f"## {table.title}", "", table.note, "", links, "", to_markdown(table.frame)]
    lines += ["## Figures", ""]
    for name, fig in figs.items():
        if fig.path:
            rel = fig.path.relative_to(out).as_posix()
            lines += [f"### {name}", "", FIGURE_CAPTIONS[name], "", f"![{name}]({rel})", ""]
        else:
            lines += [f"### {name}", "", f"Not drawn: {fig.reason}.", ""]
    (out / "index.md").write_text("\n".join(lines))


_CSS = ("body{font-family:sans-serif;max-width:1400px;margin:2em auto;padding:0 1em}"
        "table.result{border-collapse:collapse;font-size:13px;margin:.5em 0 1.5em}"
        "table.result td,table.result th{border:1px solid #ccc;padding:2px 6px;text-align:right}"
        "table.result th{background:#f0f0f0}img{max-width:100%;border:1px solid #eee}"
        ".note{color:#555}")


def _write_index_html(out, study, trials, select, summary, table_list, figs):
    esc = html.escape
    parts = [(f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{esc(study)} report"
              f"</title><style>{_CSS}</style></head><body>"),
             (f"<h1>Study {esc(study)}</h1><p>Source: {esc(_source_line(trials, ''))}. Trials: "
              f"{len(trials)}. Best LR selected by final {esc(select)}.</p>"),
             "<h2>Summary (best LR per model × family × batch size)</h2>",
             "<p><a href='summary.csv'>summary.csv</a> · <a href='summary.md'>summary.md</a></p>",
             to_html(summary)]
    for table in table_list:
        links = " · ".join(f"<a href='{esc(p.relative_to(out).as_posix())}'>{k}</a>"
                           for k, p in table.paths.items())
        parts += [f"<h2 id='{esc(table.name)}'>{esc(table.title)}</h2>",
                  f"<p class='note'>{esc(table.note)}</p><p>{links}</p>", to_html(table.frame)]
    parts.append("<h2>Figures</h2>")
    for name, fig in figs.items():
        parts.append(f"<h3 id='fig-{name}'>{esc(name)}</h3>")
        if fig.path:
            rel = esc(fig.path.relative_to(out).as_posix())
            parts.append(f"<p class='note'>{esc(FIGURE_CAPTIONS[name])}</p>"
                         f"<a href='{rel}'><img src='{rel}' alt='{esc(name)}'></a>")
        else:
            parts.append(f"<p class='note'>Not drawn: {esc(fig.reason)}.</p>")
    parts.append("</body></html>")
    (out / "index.html").write_text("\n".join(parts))


def _log_to_mlflow(trials, out: Path) -> None:
    if trials.attrs.get("source") != "mlflow":
        return
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=trials.attrs.get("tracking_uri"))
    client.log_artifacts(trials.attrs["parent_run_id"], str(out), artifact_path="report")


def make_report(study: str, tracking_uri: str | None = None, results_dir=None, out_dir=None,
                select: str = "val_accuracy", log_to_mlflow: bool = True,
                parent_run_id: str | None = None, tolerance: float = 0.01,
                target_fraction: float = 0.9) -> Path:
    """Write the study's report folder (default ``reports/<study>``) and return its path."""
    trials, metrics = load_study(study, tracking_uri, results_dir, parent_run_id)
    if trials.empty:
        raise StudyNotFoundError(f"study {study!r}: the sweep has no trials to report on")
    out = Path(out_dir or Path("reports") / study).resolve()
    out.mkdir(parents=True, exist_ok=True)
    select = tables.resolve_select(trials, select)
    table_list = [write_table(t, out / "tables") for t in tables.all_tables(
        trials, metrics, select, tolerance=tolerance, target_fraction=target_fraction)]
    best_lr = next(t for t in table_list if t.name == "best_lr").frame
    summary = summary_frame(best_lr)
    summary.to_csv(out / "summary.csv", index=False)
    (out / "summary.md").write_text(
        f"# {study}: best LR per model × family × batch size (by final {select})\n\n"
        + to_markdown(summary))
    best = tables.best_settings(trials, select)
    cost = tables.cost_to_target_frame(trials, metrics, select, target_fraction=target_fraction)
    figs = make_figures(trials, metrics, best, cost, out / "figures")
    _write_index_md(out, study, trials, select, summary, table_list, figs)
    _write_index_html(out, study, trials, select, summary, table_list, figs)
    if log_to_mlflow:
        _log_to_mlflow(trials, out)
    log.info("report for %s written to %s", study, out)
    return out


__all__ = ["Table", "load_study", "make_report", "summary_frame"]
