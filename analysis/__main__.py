"""``python -m analysis report --study NAME [...]``: write a study's report folder."""
from __future__ import annotations

import argparse
import logging
import sys

from analysis.report import make_report
from analysis.summary import best_per_family, format_best
from analysis.tables import SELECTIONS


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m analysis")
    sub = parser.add_subparsers(dest="command", required=True)
    rep = sub.add_parser("report", help="tables + figures of a study under reports/<study>")
    rep.add_argument("--study", required=True, help="study name (= MLflow experiment name)")
    rep.add_argument("--tracking-uri", default=None,
                     help="MLflow store (default: $MLFLOW_TRACKING_URI, else ./mlflow.db)")
    rep.add_argument("--results", default=None, help="Ray Tune results folder (no MLflow)")
    rep.add_argument("--out", default=None, help="report folder (default reports/<study>)")
    rep.add_argument("--select", default="val_accuracy", choices=sorted(SELECTIONS),
                     help="metric that picks the best LR (train_loss: min, as sngrad)")
    rep.add_argument("--parent-run-id", default=None, help="sweep to report (default latest)")
    rep.add_argument("--tolerance", type=float, default=0.01,
                     help="tuneability tolerance in accuracy units (0.01 = 1 point)")
    rep.add_argument("--target-fraction", type=float, default=0.9,
                     help="cost-to-target goal as a fraction of the best accuracy reached")
    rep.add_argument("--no-mlflow-log", action="store_true",
                     help="do not log the report folder to the parent run")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        out = make_report(args.study, tracking_uri=args.tracking_uri, results_dir=args.results,
                          out_dir=args.out, select=args.select,
                          log_to_mlflow=not args.no_mlflow_log,
                          parent_run_id=args.parent_run_id, tolerance=args.tolerance,
                          target_fraction=args.target_fraction)
    except (ValueError, FileNotFoundError) as err:  # bad option / study not found
        print(f"error: {err}", file=sys.stderr)
        return 2
    best = best_per_family(out)
    if not best.empty:
        print(format_best(best))
    print(out / "index.html")
    return 0


if __name__ == "__main__":
    sys.exit(main())
