"""The one ``report`` command: its options and what it does. ``python -m study report``
(what ``make report`` runs) and ``python -m analysis report`` are both this."""
from __future__ import annotations

import argparse
from pathlib import Path

from analysis import selection


def add_report_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--study", required=True, help="study name (= MLflow experiment name)")
    parser.add_argument("--tracking-uri", default=None,
                        help="MLflow store (default: $MLFLOW_TRACKING_URI, else ./mlflow.db)")
    parser.add_argument("--results", default=None, help="Ray Tune results folder (no MLflow)")
    parser.add_argument("--out", default=None, help="report folder (default reports/<study>)")
    parser.add_argument("--select", default=None, type=_selection,
                        help="what picks the tuned setting: a metric (val_accuracy, train_loss, "
                             "...; losses: lowest) or a metric at an epoch (train_loss@2, as "
                             "sngrad); default: the study's own (its spec's search.select, else "
                             "search.metric)")
    parser.add_argument("--parent-run-id", default=None,
                        help="sweep to report (default the latest)")
    parser.add_argument("--target-fraction", type=float, default=0.9,
                        help="cost-to-target goal as a fraction of the best accuracy reached")
    parser.add_argument("--spec", default=None,
                        help="a spec file whose claims: to judge (default: the sweep's own "
                             "spec, logged on its parent run)")
    parser.add_argument("--no-mlflow-log", action="store_true",
                        help="do not log the report folder to the parent run")


def _selection(text: str) -> str:
    try:
        return selection.check(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from err


def run_report(args: argparse.Namespace) -> Path:
    """Write the report, print the best setting per family and the report's path."""
    from analysis.report import make_report
    from analysis.summary import best_per_family, format_best

    tracking_uri = args.tracking_uri
    if tracking_uri and tracking_uri.startswith("sqlite:///") and not tracking_uri.startswith(
            "sqlite:////"):   # relative to where the command runs
        tracking_uri = "sqlite:///" + str(Path.cwd() / tracking_uri[len("sqlite:///"):])
    out = make_report(args.study, tracking_uri=tracking_uri, results_dir=args.results,
                      out_dir=args.out, select=args.select, log_to_mlflow=not args.no_mlflow_log,
                      parent_run_id=args.parent_run_id,
                      target_fraction=args.target_fraction, spec=getattr(args, "spec", None))
    best = best_per_family(out)
    if not best.empty:
        print(format_best(best))
    print(f"report: {out / 'index.html'}")
    return out
