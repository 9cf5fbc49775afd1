"""Where a trial's wall time goes, read back from the MLflow store after a sweep.

A trial run's wall time (MLflow start to end) splits into training (``time_s``), variance
measurement (``measure_s``) and what each trial logs at its end as ``overhead/<phase>_s``:
start-up (run, checkpoint read, model, optimizer), data, evaluation, checkpoint (the file),
Tune report (the driver's round trip per result) and logging (MLflow writes); "other" is the
rest (the loop's own Python, the trial's end). The overhead is everything but training and
measuring: (wall − time_s − measure_s) / wall, summed over the study's trials (target ≤ 10%).

    .venv/bin/python bench/trial_overhead.py [--json FILE]
        runs the default study's trial loop for a few arms (--families, one lr each, both
        models, every batch size, its 20 epochs) as small real sweeps, side by side in one run
        (one Ray runtime, interleaved --reps times): the default settings, a checkpoint every
        epoch (checkpoint.every_s 0), the training metrics over the whole training split
        (no evaluate.train_examples) and evaluation every 2nd epoch (evaluate.every 2)
    .venv/bin/python bench/trial_overhead.py --store sqlite:///mlflow.db --study NAME
        [--results results/NAME]   reads a sweep already run (``make sweep``), any version:
        stores without overhead/* give the training / measuring / overhead split only

It also reports the Tune folder's size and its experiment-state file per trial (targets for
the default study: ≤ 50 MB in all, ≤ 5 KB a trial).
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
PHASES = ("startup", "data", "eval", "checkpoint", "report", "log")
VARIANTS = {"default": {}, "checkpoint every epoch": {"checkpoint": {"every_s": 0}},
            "train metrics on all": {"evaluate": {"train_examples": None}},
            "evaluate every 2": {"evaluate": {"every": 2}}}   # each over the default's sections


def split(uri: str, study: str) -> dict[str, float]:
    """Seconds summed over the latest sweep's trial runs: wall, training, measuring, phases."""
    from mlflow.tracking import MlflowClient

    from study import contract as C

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(study)
    (parent,) = client.search_runs([exp.experiment_id], f"tags.`{C.TAG_KIND}` = '{C.KIND_STUDY}'",
                                   order_by=["attributes.start_time DESC"], max_results=1)
    runs = client.search_runs([exp.experiment_id],
                              f"tags.`{C.TAG_PARENT}` = '{parent.info.run_id}'", max_results=5000)
    total = collections.Counter()
    for run in runs:
        if run.info.end_time is None:
            continue
        m = run.data.metrics
        total["trials"] += 1
        total["wall"] += (run.info.end_time - run.info.start_time) / 1000
        total["training"] += m.get(C.TIME_S, 0.0)
        total["measuring"] += m.get(C.MEASURE_S, 0.0)
        for phase in PHASES:
            total[phase] += m.get(f"{C.OVERHEAD_PREFIX}{phase}_s", 0.0)
    total["overhead"] = total["wall"] - total["training"] - total["measuring"]
    if any(total[p] for p in PHASES):
        total["other"] = total["overhead"] - sum(total[p] for p in PHASES)
    return dict(total)


def storage(folder: Path, trials: int) -> dict[str, float]:
    """The Tune folder's bytes and its experiment state's bytes, per trial."""
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    states = sorted(folder.glob("experiment_state*.json"))
    return {"folder_mb": size / 1e6, "folder_kb_per_trial": size / trials / 1e3,
            "state_kb_per_trial": states[-1].stat().st_size / trials / 1e3 if states else 0.0}


def show(name: str, t: dict[str, float]) -> None:
    wall = t["wall"]
    parts = ["training", "measuring", *(PHASES if "other" in t else ()), "other"]
    shares = "  ".join(f"{p} {100 * t[p] / wall:.1f}%" for p in parts if p in t)
    print(f"{name:>24}: {t['trials']:.0f} trials, wall {wall:.0f} s, "
          f"overhead {100 * t['overhead'] / wall:.1f}%  ({shares})")
    if "folder_mb" in t:
        print(f"{'':>24}  Tune folder {t['folder_mb']:.1f} MB "
              f"({t['folder_kb_per_trial']:.0f} KB a trial), experiment state "
              f"{t['state_kb_per_trial']:.2f} KB a trial")


def bench_spec(families: list[str], variant: dict, data_root: Path):
    """The default study's arms of ``families`` at the middle of each lr grid."""
    import yaml

    from study.spec import parse_spec

    raw = yaml.safe_load((ROOT / "search_spaces" / "default.yaml").read_text())
    default = parse_spec(raw)
    raw["families"] = {f: dict(raw["families"][f] or {}) for f in families}
    for name, family in raw["families"].items():
        grid = default.lr_grid(name)
        family["lr"] = [grid[len(grid) // 2]]
    raw["dataset"]["root"] = str(data_root)
    changed = {section: {**(raw.get(section) or {}), **values}
               for section, values in variant.items()}
    return parse_spec({**raw, **changed, "name": "overhead"})


def side_by_side(args) -> dict[str, dict[str, float]]:
    import ray

    from study.tune import run_study

    tmp = Path(tempfile.mkdtemp(prefix="gs-overhead-"))
    os.environ.setdefault("RAY_TMPDIR", str(tmp / "ray"))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT),
                                                             os.environ.get("PYTHONPATH")]))
    out: dict[str, collections.Counter] = {name: collections.Counter() for name in VARIANTS}
    try:
        for rep in range(args.reps):
            names = list(VARIANTS) if rep % 2 == 0 else list(reversed(VARIANTS))
            for i, name in enumerate(names):
                work = tmp / f"r{rep}v{i}"
                uri = f"sqlite:///{work}/mlflow.db"
                work.mkdir(parents=True)
                spec = bench_spec(args.families, VARIANTS[name], ROOT / "data")
                result = run_study(spec, storage=str(work / "results"), tracking_uri=uri)
                assert result.statuses.get("finished") == spec.num_trials(), result.statuses
                t = split(uri, spec.name)
                t.update(storage(work / "results" / spec.name, int(t["trials"])))
                out[name].update(t)
    finally:
        ray.shutdown()
    return {name: {k: v / (args.reps if k.endswith(("_mb", "_per_trial")) else 1)
                   for k, v in t.items()} for name, t in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", help="read this MLflow store instead of running sweeps")
    ap.add_argument("--study", default="mnist1d_families")
    ap.add_argument("--results", help="with --store: the study's Tune folder")
    ap.add_argument("--families", default="sgd,kfac", help="side by side: families to run")
    ap.add_argument("--reps", type=int, default=1, help="side by side: interleaved repeats")
    ap.add_argument("--json", help="write the figures to this file")
    args = ap.parse_args()
    args.families = args.families.split(",")
    load = os.getloadavg()[0]
    start = time.time()
    if args.store:
        t = split(args.store, args.study)
        if args.results:
            t.update(storage(Path(args.results), int(t["trials"])))
        figures = {args.study: t}
    else:
        figures = side_by_side(args)
    print(f"load average {load:.1f} before, {os.getloadavg()[0]:.1f} after "
          f"({time.time() - start:.0f} s); {os.cpu_count()} cores")
    for name, t in figures.items():
        show(name, t)
    if args.json:
        Path(args.json).write_text(json.dumps({"figures": figures, "load_before": load},
                                              indent=1))


if __name__ == "__main__":
    main()
