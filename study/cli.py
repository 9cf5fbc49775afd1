"""``python -m study validate|sweep|report`` (``make sweep`` and ``make report`` call these).

A sweep runs the study, then writes its report, then prints a summary: the best setting per
family, the trials by status, how long it took, and where to look next. Every expected
failure is one ``error:`` line per problem naming the field or file, exit status 2.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from study import contract as C
from study.spec import SpecError, load_spec

INTERRUPTED_RC = 130


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m study", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    v = sub.add_parser("validate", help="check a spec; print the number of trials it resolves to")
    v.add_argument("spec")
    d = sub.add_parser("has-data", help="say whether a spec's dataset is on disk (rc 0) or "
                                        "not (rc 1, one 'skipped <study>: ...' line)")
    d.add_argument("spec")
    f = sub.add_parser("families", help="list the optimizer families, variants and options")
    f.add_argument("--plugins", nargs="*", default=[], help="plugin modules or .py files")
    s = sub.add_parser("sweep", help="run (or resume) a study, then write its report")
    s.add_argument("spec")
    s.add_argument("--address", help="Ray cluster address (default: a local Ray runtime)")
    s.add_argument("--tracking-uri", help="MLflow tracking URI (default: the spec's tracking.uri)")
    s.add_argument("--storage", help="Tune results folder or s3:// URI (default: spec storage)")
    s.add_argument("--fresh", action="store_true",
                   help="start a new sweep instead of resuming the stored one")
    s.add_argument("--no-report", action="store_true", help="skip the report at the end")
    c = sub.add_parser("claims", help="print the claims tables of studies' reports")
    c.add_argument("studies", nargs="+", help="study names (reports/<study>/claims.csv)")
    c.add_argument("--reports", default="reports", help="the reports folder")
    from analysis.command import add_report_arguments, run_report  # the one report command

    add_report_arguments(sub.add_parser("report", help="write reports/<study>/ from the "
                                                       "study's runs"))
    args = parser.parse_args(argv)

    try:
        if args.command == "validate":
            spec = load_spec(args.spec)
            print(f"{args.spec}: OK, study {spec.name!r}: {spec.num_trials():,} trials "
                  f"({spec.search.kind} search)")
            return 0
        if args.command == "has-data":
            return _has_data(load_spec(args.spec))
        if args.command == "families":
            _print_families(args.plugins)
            return 0
        if args.command == "sweep":
            return _sweep(args)
        if args.command == "claims":
            return _print_claims([Path(args.reports) / name for name in args.studies])
        run_report(args)
    except (SpecError, ConnectionError, FileNotFoundError, ValueError) as err:
        for line in str(err).strip().splitlines() or [type(err).__name__]:
            print(f"error: {line.strip()}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return INTERRUPTED_RC
    return 0


def _report(study: str, tracking_uri: str | None, results=None, select=None,
            parent_run_id: str | None = None):
    """The report; ``select`` None: the selection of the spec the sweep logged."""
    from analysis.report import make_report

    return make_report(study, tracking_uri=tracking_uri, results_dir=results, select=select,
                       parent_run_id=parent_run_id)


def _sweep(args) -> int:
    from study.tune import run_study

    spec = load_spec(args.spec)
    result = run_study(spec, args.spec, address=args.address, storage=args.storage,
                       tracking_uri=args.tracking_uri, fresh=args.fresh)
    counts = ", ".join(f"{n} {status}" for status, n in sorted(result.statuses.items()))
    total = sum(result.statuses.values())
    if result.interrupted:
        print(f"study {result.name}: interrupted after {_duration(result.seconds)} ({counts}); "
              f"run the same command again to resume", file=sys.stderr)
        return INTERRUPTED_RC
    print(f"\nstudy {result.name}: {total} trials in {_duration(result.seconds)}: {counts}")
    if args.no_report:
        print(f"report skipped; write it with: make report STUDY={result.name}")
        return 0
    started = time.monotonic()
    try:
        out = _report(result.name, result.tracking_uri, parent_run_id=result.parent_run_id)
    except KeyboardInterrupt:
        print(f"error: interrupted during the report; the sweep itself is complete: "
              f"make report STUDY={result.name}", file=sys.stderr)
        return INTERRUPTED_RC
    _print_best(out)
    if (out / C.CLAIMS_ARTIFACT).exists():
        _print_claims([out])
    print(f"report: {out / 'index.html'} ({_duration(time.monotonic() - started)}; also under "
          f"report/ of MLflow parent run {result.parent_run_id})")
    print(f"compare the runs: {_ui_command(result.tracking_uri)}")
    return 0


def _print_claims(report_dirs: list[Path]) -> int:
    """The claims of each report folder, one line each; rc 1 when a report has none."""
    from analysis.claims import format_claims

    missing = [d for d in report_dirs if not (d / C.CLAIMS_ARTIFACT).exists()]
    found = [d for d in report_dirs if d not in missing]
    if found:
        print(format_claims([d / C.CLAIMS_ARTIFACT for d in found]))
    for d in missing:
        print(f"{d.name}: no {C.CLAIMS_ARTIFACT} (run the study, or make report STUDY={d.name})")
    return 1 if missing else 0


def _has_data(spec) -> int:
    """rc 0 when the spec's dataset can be read without downloading; else rc 1 and the line
    ``make reproduce`` shows for the study it skips."""
    from study.data import IMAGE_DATASETS, missing_dataset

    why = None if spec.dataset.download else missing_dataset(spec.dataset.name,
                                                             spec.dataset.root)
    if why:
        print(f"skipped {spec.name}: {why}")
        return 1
    where = ("generated here" if spec.dataset.name not in IMAGE_DATASETS
             else f"found under {spec.dataset.root}")
    print(f"{spec.name}: {spec.dataset.name} {where}")
    return 0


def _print_families(plugins: list[str]) -> None:
    from study.optim import FAMILIES
    from study.optim.options import describe
    from study.plugins import import_plugins, resolve

    import_plugins([resolve(p, None) for p in plugins])
    for name, cls in sorted(FAMILIES.items()):
        print(f"{name}: variants {', '.join(cls.variants)} (default {cls.variants[0]})")
        for option, text in describe(cls.Options).items():
            print(f"    {option} = {text}")


def _print_best(report_dir) -> None:
    from analysis.summary import best_per_family, format_best

    best = best_per_family(report_dir)
    if best.empty or best["lr"].isna().all():
        print("no family has a usable trial (see the report's trial counts)")
        return
    print("best setting per family (seed means at the setting the selection metric chose):")
    print("\n".join("  " + line for line in format_best(best).splitlines()))


def _ui_command(uri: str) -> str:
    from pathlib import Path

    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///"):])
        if db == Path.cwd() / "mlflow.db":
            return "make ui (then open http://127.0.0.1:5000)"
        return f"mlflow ui --backend-store-uri {uri}"
    return f"open {uri} in a browser"


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes} min {secs} s" if minutes else f"{secs} s"
