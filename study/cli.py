"""``python -m study validate|sweep|report`` (``make sweep`` and ``make report`` call these)."""
from __future__ import annotations

import argparse
import sys

from study.spec import SpecError, load_spec


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m study", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    v = sub.add_parser("validate", help="check a spec; print the number of trials it resolves to")
    v.add_argument("spec")
    s = sub.add_parser("sweep", help="run (or resume) a study")
    s.add_argument("spec")
    s.add_argument("--address", help="Ray cluster address (default: a local Ray runtime)")
    s.add_argument("--tracking-uri", help="MLflow tracking URI (default: the spec's tracking.uri)")
    s.add_argument("--storage", help="Tune results folder or s3:// URI (default: spec storage)")
    s.add_argument("--fresh", action="store_true",
                   help="start a new sweep instead of resuming the stored one")
    s.add_argument("--no-report", action="store_true", help="skip the report at the end")
    r = sub.add_parser("report", help="write reports/<study>/ from the study's runs")
    r.add_argument("--study", required=True)
    r.add_argument("--tracking-uri", default="sqlite:///mlflow.db")
    r.add_argument("--results", help="a Ray Tune results folder (when there is no MLflow store)")
    r.add_argument("--select", default="val_accuracy",
                   help="how the best lr is chosen: val_accuracy, test_accuracy or train_loss")
    args = parser.parse_args(argv)

    try:
        if args.command == "validate":
            spec = load_spec(args.spec)
            print(f"{args.spec}: OK, study {spec.name!r}: {spec.num_trials()} trials "
                  f"({spec.search.kind} search)")
        elif args.command == "sweep":
            from study.tune import run_study

            spec = load_spec(args.spec)
            result = run_study(spec, args.spec, address=args.address, storage=args.storage,
                               tracking_uri=args.tracking_uri, fresh=args.fresh,
                               report=not args.no_report)
            if result.interrupted:
                print(f"study {result.name}: interrupted; run the same command again to resume",
                      file=sys.stderr)
                return 130
            print(f"study {result.name}: {result.statuses}; MLflow parent run "
                  f"{result.parent_run_id} in {result.tracking_uri}")
            if result.report_dir:
                print(f"report: {result.report_dir}/index.md")
        else:
            from analysis.report import make_report
            from study.tracking import resolve_uri

            out = make_report(args.study, tracking_uri=resolve_uri(args.tracking_uri),
                              results_dir=args.results, select=args.select)
            print(f"report: {out}/index.md")
    except (SpecError, ConnectionError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0
