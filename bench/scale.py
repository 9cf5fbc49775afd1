"""Flat at scale: what a trial costs besides its training, at 200 and at 2,000 trials.

A study of tiny trials (sine2d, 400 training examples, an MLP 2-8-2, plain SGD at 10 learning
rates x N/10 seeds, 1 epoch, no variance measurement: each trial trains for milliseconds) runs
through the product's sweep (``study.tune.run_study``: MLflow sqlite child runs, Tune reports,
checkpoints, the lean experiment state, the trial-status callback) on a simulated multi-node
Ray cluster (``ray.cluster_utils.Cluster``: a head with no CPUs for trials, ``--nodes`` worker
nodes of ``--cpus`` CPUs each), once per size in ``--trials``, one cluster for all. Per trial:

- **driver**: the sweep's wall time / trials (trials run ``nodes x cpus`` at once; also the
  trials' span, first run's start to last run's end / trials) and the driver process's CPU
  seconds / trials (Tune's controller loop, its callbacks, the driver's
  MLflow calls), with the number of experiment-state snapshots Tune wrote and their time;
- **MLflow**: on the driver, the time of its per-trial calls (``settle`` in ``TrialOutcomes``);
  in the trials, what each logs as ``overhead/startup_s`` (its run created or found, the
  model built) and ``overhead/log_s`` (metric writes), and the run's wall time (start to end);
- **storage**: the experiment-state file, the Tune folder and the study's ``trials/`` folder,
  bytes per trial, and the sqlite store's bytes per trial.

Target: each per-trial figure at the largest size <= 1.2x the one at the smallest. The
smallest runs before and after the largest by default and counts their mean, so a machine
whose load changes during the bench (this one is shared) biases neither side.

    .venv/bin/python bench/scale.py [--trials 200,2000,200] [--nodes 2] [--cpus 1] [--json FILE]

Measured (2 worker nodes x 1 CPU, load average 2-4; 33 s for 200 trials, 205 s for 2,000):
wall / trial 0.167 -> 0.102 s (0.61x), driver CPU 53 -> 48 ms (0.91x), snapshots 1.2 -> 1.4 ms
(1.17x), driver MLflow 13.7 -> 11.9 ms, trial runs 145 -> 122 ms, experiment state 5.54 ->
5.55 KB, Tune folder 9.9 KB, trials/ 32 B a trial: every ratio within 1.2x. A later stop
(compact state, load 0.8-2.9, twice): driver wall 0.69x / 0.68x, driver CPU 0.91x / 0.92x,
trial runs 1.08x / 1.00x, Tune reports 1.23x / 1.10x, state 4.64 -> 4.65 KB; snapshots' time
per trial 1.25x / 1.37x (under 1 ms: O(trials) each, more of them in a longer sweep). Before
(commit 8d59ff4, 200 and 1,000 trials, load 9-25): wall / trial 0.299 -> 0.583 s (1.95x),
driver CPU 103 -> 311 ms (3.0x), one snapshot of the whole state per trial (its last-epoch
checkpoint forced it: CheckpointConfig(num_to_keep=1)), 17.8 -> 84.2 ms / trial (4.7x).
"""
from __future__ import annotations

import argparse
import cProfile
import functools
import json
import os
import pstats
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
LRS = [0.02 * (i + 1) for i in range(10)]
TARGET = 1.2


def bench_spec(trials: int):
    """``trials`` tiny trials: 10 learning rates x trials/10 seeds."""
    from study.spec import parse_spec

    return parse_spec({
        "name": f"scale{trials}",
        "dataset": {"name": "sine2d", "size": 500, "val_fraction": 0.2},
        "models": [{"name": "mlp", "widths": [8]}],
        "epochs": 1, "seeds": list(range(max(1, trials // len(LRS)))), "lr": LRS,
        "batch_size": [100], "families": {"sgd": {"variants": ["plain"]}},
        "search": {"kind": "grid", "metric": "val_accuracy", "mode": "max",
                   "max_trials": max(trials, 10000)},
        "measure": {"points": 0}, "resources": {"cpu": 1},
    })


class Timed:
    """Calls and seconds of a wrapped driver-side function."""

    def __init__(self):
        self.calls, self.seconds = 0, 0.0

    def wrap(self, fn):
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.calls += 1
                self.seconds += time.perf_counter() - start
        return timed


def instrument() -> dict[str, Timed]:
    """Count the driver's experiment-state snapshots and its per-trial MLflow calls."""
    from ray.tune.execution.tune_controller import TuneController

    import study.tune

    timers = {"snapshot": Timed(), "settle": Timed()}
    TuneController.save_to_dir = timers["snapshot"].wrap(TuneController.save_to_dir)
    study.tune.settle = timers["settle"].wrap(study.tune.settle)
    return timers


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def from_store(uri: str, study: str) -> dict[str, float]:
    """Seconds per trial run, read back: wall (start to end) and the logged phases."""
    from mlflow.tracking import MlflowClient

    from study import contract as C
    from study.tracking import children

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(study)
    (parent,) = client.search_runs([exp.experiment_id], f"tags.`{C.TAG_KIND}` = '{C.KIND_STUDY}'")
    runs = children(uri, exp.experiment_id, parent.info.run_id)
    total = {"run_wall_s": 0.0, "training_s": 0.0}
    phases = ("startup", "data", "eval", "checkpoint", "report", "log")
    total.update({f"{p}_s": 0.0 for p in phases})
    ended = [run for run in runs if run.info.end_time is not None]
    span = (max(r.info.end_time for r in ended) - min(r.info.start_time for r in ended)) / 1000
    for run in ended:
        m = run.data.metrics
        total["run_wall_s"] += (run.info.end_time - run.info.start_time) / 1000
        total["training_s"] += m.get(C.TIME_S, 0.0)
        for p in phases:
            total[f"{p}_s"] += m.get(f"{C.OVERHEAD_PREFIX}{p}_s", 0.0)
    out = {k: v / len(ended) for k, v in total.items()}
    return {**out, "span_s": span / len(ended), "runs_not_ended": len(runs) - len(ended)}


def run_size(trials: int, work: Path, timers: dict[str, Timed],
             profile: bool = False) -> dict[str, float]:
    from study.tune import run_study

    spec = bench_spec(trials)
    n = spec.num_trials()
    uri = f"sqlite:///{work / 'mlflow.db'}"
    for t in timers.values():
        t.calls, t.seconds = 0, 0.0
    profiler = cProfile.Profile() if profile else None
    cpu, start = time.process_time(), time.perf_counter()
    if profiler:
        profiler.enable()
    result = run_study(spec, storage=str(work / "results"), tracking_uri=uri)
    if profiler:
        profiler.disable()
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    if profiler:   # where the driver's time goes, per trial: what grows with the study
        print(f"driver profile, {n} trials (ms per trial, own time):")
        stats = pstats.Stats(profiler)
        top = sorted(stats.stats.items(), key=lambda kv: -kv[1][2])[:15]
        for (file, line, fn), (_, calls, own, _ct, _) in top:
            print(f"  {1e3 * own / n:7.2f} {calls / n:9.1f} calls  {fn} "
                  f"({Path(file).name}:{line})")
    folder = work / "results" / spec.name
    states = sorted(folder.glob("experiment_state*.json"))
    out = {"trials": n, "wall_s": wall, "driver_s": wall / n, "driver_cpu_s": cpu / n,
           "snapshots": timers["snapshot"].calls, "snapshot_s": timers["snapshot"].seconds / n,
           "driver_mlflow_s": timers["settle"].seconds / n,
           "state_kb": states[-1].stat().st_size / n / 1e3,
           "tune_folder_kb": folder_bytes(folder) / n / 1e3,
           "trials_folder_kb": folder_bytes(folder / "trials") / n / 1e3,
           "mlflow_db_kb": sum(f.stat().st_size for f in work.glob("mlflow.db*")   # + its WAL
                               if f.name != "mlflow.db-shm") / n / 1e3,
           "load_avg": os.getloadavg()[0], "statuses": result.statuses}
    out.update(from_store(uri, spec.name))
    out["trial_mlflow_s"] = out["log_s"]
    return out


ROWS = [("wall_s", "sweep wall time, s", "{:.0f}"), ("driver_s", "wall / trial, s", "{:.3f}"),
        ("span_s", "first trial start -> last end / trial, s", "{:.3f}"),
        ("driver_cpu_s", "driver CPU / trial, s", "{:.3f}"),
        ("snapshots", "experiment-state snapshots", "{:.0f}"),
        ("snapshot_s", "snapshot time / trial, s", "{:.4f}"),
        ("driver_mlflow_s", "driver MLflow / trial, s", "{:.4f}"),
        ("run_wall_s", "trial run wall (MLflow start-end), s", "{:.3f}"),
        ("training_s", "of it training, s", "{:.3f}"),
        ("startup_s", "of it start-up (run created), s", "{:.3f}"),
        ("report_s", "of it Tune reports, s", "{:.3f}"),
        ("checkpoint_s", "of it checkpoints, s", "{:.3f}"),
        ("log_s", "of it MLflow writes, s", "{:.3f}"),
        ("state_kb", "experiment state / trial, KB", "{:.2f}"),
        ("tune_folder_kb", "Tune folder / trial, KB", "{:.1f}"),
        ("trials_folder_kb", "trials/ folder / trial, KB", "{:.3f}"),
        ("mlflow_db_kb", "MLflow db / trial, KB", "{:.1f}"),
        ("load_avg", "1-min load average at the end", "{:.1f}")]
PER_TRIAL = {"driver_s", "span_s", "driver_cpu_s", "snapshot_s", "driver_mlflow_s", "run_wall_s",
             "startup_s", "report_s", "checkpoint_s", "log_s", "state_kb", "tune_folder_kb",
             "trials_folder_kb", "mlflow_db_kb"}


def show(figures: dict[int, dict[str, float]]) -> None:
    sizes = sorted(figures)
    small, large = figures[sizes[0]], figures[sizes[-1]]
    print(f"| per trial | {' | '.join(str(s) for s in sizes)} | {sizes[-1]}/{sizes[0]} |")
    print("|---|" + "---|" * (len(sizes) + 1))
    for key, label, fmt in ROWS:
        ratio = ""
        if key in PER_TRIAL and small[key] >= 1e-3:     # not sub-millisecond noise
            r = large[key] / small[key]
            ratio = f"{r:.2f}x" + (" ok" if r <= TARGET else " OVER")
        cells = " | ".join(fmt.format(figures[s][key]) for s in sizes)
        print(f"| {label} | {cells} | {ratio} |")
    for s in sizes:
        print(f"{s} trials: {figures[s]['statuses']}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", default="200,2000,200",
                    help="study sizes in order, comma-separated (a repeated size: its mean)")
    ap.add_argument("--nodes", type=int, default=2, help="worker nodes of the cluster")
    ap.add_argument("--cpus", type=int, default=1, help="CPUs declared per worker node")
    ap.add_argument("--profile", action="store_true",
                    help="profile the driver: its top functions per trial at each size")
    ap.add_argument("--json", help="write the figures to this file")
    args = ap.parse_args()

    import ray
    from ray.cluster_utils import Cluster

    tmp = Path(tempfile.mkdtemp(prefix="gs-scale-", dir="/tmp"))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT),
                                                             os.environ.get("PYTHONPATH")]))
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    cluster = Cluster(initialize_head=True,
                      head_node_args={"num_cpus": 0, "include_dashboard": False,
                                      "temp_dir": str(tmp / "ray")})
    for _ in range(args.nodes):
        cluster.add_node(num_cpus=args.cpus)
    ray.init(address=cluster.address, log_to_driver=False)
    timers = instrument()
    runs: dict[int, list[dict]] = {}
    try:
        for i, trials in enumerate(int(s) for s in args.trials.split(",")):
            work = tmp / f"{i}-n{trials}"
            work.mkdir()
            runs.setdefault(trials, []).append(run_size(trials, work, timers, args.profile))
            print(f"{trials} trials: {json.dumps(runs[trials][-1])}", flush=True)
    finally:
        ray.shutdown()
        cluster.shutdown()
    # a size run more than once (200,2000,200: before and after the other) counts its mean
    figures = {n: {k: (statistics.mean(r[k] for r in rs) if k != "statuses" else
                       [r[k] for r in rs]) for k in rs[0]} for n, rs in runs.items()}
    print(f"{args.nodes} worker nodes x {args.cpus} CPU (head: none) on {os.cpu_count()} cores; "
          f"sizes in this order: {args.trials}")
    show(figures)
    if args.json:
        Path(args.json).write_text(json.dumps(runs, indent=1))


if __name__ == "__main__":
    main()
