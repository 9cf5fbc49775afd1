"""One study -> ``reports/<study>/``: tables (CSV/Markdown/LaTeX), figures (PNG), ``index.md``
(relative links), a self-contained ``index.html`` (``analysis.html``), ``summary.md``/
``summary.csv`` and ``best.csv`` (``analysis.summary``). Read from MLflow, the folder is also
logged under ``report/`` (``contract.REPORT_DIR``) on the study's parent run, with the best
metrics and a description, so ``mlflow ui`` shows it.
"""
from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import pandas as pd

from analysis import claims as claims_mod
from analysis import figures, figures_studies, protocol, selection, summary, tables

# One artifact download per trial: MLflow's per-download progress bars would flood the sweep.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
from analysis.html import write_index_html
from analysis.load import (
    StudyNotFoundError,
    download_grad_hist,
    download_text,
    load_mlflow,
    load_tune,
)
from analysis.summary import best_per_family, format_best
from analysis.writer import Table, percent_name, to_markdown, write_table
from study import contract as C

log = logging.getLogger(__name__)

SUMMARY_COLUMNS = ("dataset", "model", "family", "variant", "batch_size", "best_lr", "edge",
                   percent_name(C.TEST_ACCURACY), C.TRAIN_LOSS, "n_diverged")
FIGURE_CAPTIONS = {
    "lr_sensitivity": "Final test accuracy vs learning rate (seed mean ± std; colour = family, "
                      "line style = variant; x = diverged).",
    "lr_bs_heatmaps": "Final test accuracy (%) over the LR × batch-size grid, per family.",
    "learning_curves": "Learning curves at each family's tuned setting: test accuracy and "
                       "train loss per gradient evaluation, test accuracy per training second "
                       "(seed mean, band: ±1 std over seeds; colour = family, line style = "
                       "variant; x = the end of a family whose every LR diverged).",
    "variance": "Variance and normalized variance of each family's step direction "
                "(var/dir_*, thick) beside plain SGD's gradient at the same weights "
                "(var/sgd_*, thin), against examples seen (Faghri et al.; colour = family, "
                "line style = variant, x = diverged).",
    "grad_histograms": "Histograms of |gradient entries| over training (log-log).",
    "estimators": "Variance and normalized variance of every estimator measured along one "
                  "trajectory (the first seed of each tuned setting): the trial's update, SGD "
                  "at B and the shadow estimators at the same weights (Faghri et al., Fig. 2); "
                  "SVRG's variance is ~0 right after a snapshot (below the axis).",
    "critical_batch_front": "Steps against examples to the target training loss at each batch "
                            "size's best lr, the fitted front (S/S_min − 1)(E/E_min − 1) = 1 "
                            "and the batch size B_simple predicts (McCandlish et al., Fig. 3).",
    "performance_profiles": "Performance profiles of the cost to reach the validation target "
                            "(AlgoPerf), over at least 5 problems (dataset × model).",
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


def make_figures(trials, metrics, best, cost, out_dir: Path, claims: list[dict] = ()
                 ) -> dict[str, figures.FigureResult]:
    out_dir = Path(out_dir)
    results = {
        "lr_sensitivity": figures.lr_sensitivity(trials, out_dir),
        "lr_bs_heatmaps": figures.lr_bs_heatmaps(trials, out_dir),
        "learning_curves": figures.learning_curves(metrics, best, out_dir),
        "variance": figures.variance_curves(metrics, best, out_dir),
        "grad_histograms": figures.grad_histograms(_grad_hists(trials, best), out_dir),
        "performance_profiles": figures.performance_profiles(cost, out_dir),
    }
    # the reproduction studies' own figures, only in studies that have what they show
    if not metrics.empty and set(figures_studies.estimators_of(metrics)) - {C.DIRECTION,
                                                                           C.SGD_GRADIENT}:
        results["estimators"] = figures_studies.estimator_curves(metrics, best, out_dir)
    targets = figures_studies.critical_batch_targets(list(claims))
    if targets:
        results["critical_batch_front"] = figures_studies.critical_batch_front(
            trials, metrics, targets, out_dir)
    return results


def _source_line(trials, quote: str = "`") -> str:
    attrs = trials.attrs
    if attrs.get("source") == "mlflow":
        return (f"MLflow {attrs.get('tracking_uri') or '(default URI)'}, parent run "
                f"{quote}{attrs.get('parent_run_id')}{quote}")
    return f"Ray Tune results {quote}{attrs.get('results_dir')}{quote}"


def _intro(trials, select, quote: str = "`") -> str:
    text = (f"Source: {_source_line(trials, quote)}. {summary.status_line(trials)}. "
            f"Best LR selected by {quote}{selection.describe(select)}{quote}; only finished, "
            "stopped and "
            "diverged trials are results.")
    if tables.usable(trials).empty:
        text += " No trial is a result: the tables below are empty and no figure is drawn."
    return text


def study_spec_text(trials, spec: str | Path | None = None) -> str | None:
    """The text of ``spec`` (a spec file) when given, else of the spec the sweep logged on its
    parent run (MLflow); None for a Tune folder without a spec."""
    if spec is not None:
        return Path(spec).read_text()
    if trials.attrs.get("source") == "mlflow":
        return download_text(trials.attrs.get("tracking_uri"), trials.attrs["parent_run_id"],
                             C.SPEC_ARTIFACT)
    return None



PROTOCOL_TITLE = "Protocol checks"


def _protocol_lines(warnings: list[str]) -> list[str]:
    return warnings or ["Every check passed: equal tuning budgets, tuned LRs inside their "
                        "grids, several seeds, like compared with like."]


def _write_index_md(out, study, trials, select, sections, table_list, figs, opening, warnings):
    lines = [f"# Study `{study}`", ""]
    for table in opening:  # the claims first: what the study set out to show
        links = " · ".join(f"[{p.name}]({p.relative_to(out).as_posix()})"
                           for p in table.paths.values())
        lines += [f"## {table.title}", "", table.note, "", links, "", to_markdown(table.frame)]
    lines += [f"## {PROTOCOL_TITLE}", ""] + [f"- {w}" for w in _protocol_lines(warnings)]
    lines += ["", _intro(trials, select), ""]
    for _, title, note, files, frame in sections:
        links = " · ".join(f"[{p.name}]({p.relative_to(out).as_posix()})" for p in files)
        lines += [f"## {title}", "", note, "", links, "", to_markdown(frame)]
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


def _log_to_mlflow(trials, out: Path, note: str, metrics: dict[str, float],
                   tags: dict[str, str] | None = None) -> None:
    """The report folder under ``report/`` on the parent run, the best metrics, the claims'
    values and verdicts and the run's description beside it."""
    if trials.attrs.get("source") != "mlflow":
        return
    from mlflow import MlflowClient

    uri, parent = trials.attrs.get("tracking_uri"), trials.attrs["parent_run_id"]
    MlflowClient(tracking_uri=uri).log_artifacts(parent, str(out), artifact_path=C.REPORT_DIR)
    summary.log_summary(uri, parent, metrics, note, tags)


def make_report(study: str, tracking_uri: str | None = None, results_dir=None, out_dir=None,
                select: str | None = None, log_to_mlflow: bool = True,
                parent_run_id: str | None = None,
                target_fraction: float = 0.9, spec: str | Path | None = None) -> Path:
    """Write the study's report folder (default ``reports/<study>``) and return its path.
    ``spec``: a spec file whose ``claims:`` (and selection) to use (default: the sweep's own
    spec). ``select``: what picks the tuned settings (``analysis.selection``; default: the
    spec's ``search.select``, else its ``search.metric``, else val_accuracy)."""
    trials, metrics = load_study(study, tracking_uri, results_dir, parent_run_id)
    if trials.empty:
        raise StudyNotFoundError(f"study {study!r}: the sweep has no trials to report on")
    out = Path(out_dir or Path("reports") / study).resolve()
    out.mkdir(parents=True, exist_ok=True)
    spec_text = study_spec_text(trials, spec)
    select = select or selection.of_spec(spec_text)
    trials = selection.with_selection_column(trials, metrics, select)
    select = tables.resolve_select(trials, select)
    table_list = [write_table(t, out / "tables") for t in [
        *tables.all_tables(trials, metrics, select, target_fraction=target_fraction),
        protocol.budget_table(trials), protocol.comparison_table(trials, select)]]
    warnings = (protocol.protocol_warnings(trials, select)
                + protocol.measurement_warnings(trials, metrics))
    claims = claims_mod.claims_of(spec_text)
    results = claims_mod.evaluate(claims, trials, metrics, select)
    claims_table = claims_mod.claims_table(results)
    claims_table.paths = {"csv": claims_mod.claims_csv(results, out / C.CLAIMS_ARTIFACT)}
    best_lr = next(t for t in table_list if t.name == "best_lr").frame
    summary_table = summary_frame(best_lr)
    summary_table.to_csv(out / "summary.csv", index=False)
    (out / "summary.md").write_text(
        f"# {study}: best LR per model × family × batch size (by {selection.describe(select)})"
        "\n\n"
        + to_markdown(summary_table))
    best_rows = summary.best_frame(trials, select)
    best_file = summary.write_best(best_rows, out)
    sections = [
        ("best", "Best setting per model × family",
         f"The tuned setting of each family (by {selection.describe(select)}, seed means; "
         "accuracies as "
         "percent); blank where every LR diverged or no trial is a result.", [best_file],
         tables.drop_redundant_arm(best_rows)),
        ("summary", "Summary (best LR per model × family × batch size)", "",
         [out / "summary.csv", out / "summary.md"], summary_table)]
    best = tables.best_settings(trials, select)
    cost = tables.cost_to_target_frame(trials, metrics, select, target_fraction=target_fraction)
    figs = make_figures(trials, metrics, best, cost, out / "figures", claims)
    _write_index_md(out, study, trials, select, sections, table_list, figs, [claims_table],
                    warnings)
    write_index_html(out, study=study, intro=_intro(trials, select, quote=""),
                     sections=sections, table_list=table_list, figs=figs,
                     captions=FIGURE_CAPTIONS, opening=[claims_table],
                     warnings=(PROTOCOL_TITLE, _protocol_lines(warnings)))
    if log_to_mlflow:
        claim_values, claim_tags = claims_mod.claim_metrics(results)
        _log_to_mlflow(trials, out, summary.description(study, trials, best_rows, select),
                       {**summary.best_metrics(best_rows), **claim_values}, claim_tags)
    log.info("report for %s written to %s", study, out)
    return out


__all__ = ["Table", "best_per_family", "format_best", "load_study", "make_report",
           "summary_frame"]
