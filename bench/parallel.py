"""What running trials as a Ray study buys over running them one after another, against
what two plain processes side by side get on the same cores (the physical limit).

The same trials (the default study's MLP 40-100-100-10 with SGD+momentum and the default
variance measurement, ``--trials`` seeds at lr 0.1, batch 32, on MNIST-1D generated at
``--size`` examples, 70k by default, so that epochs are long (~1 s) rather than many; epochs
chosen so one trial takes about ``--trial-seconds`` here), or with ``--spec FILE`` a whole
study's trials as written (e.g. the default study's 300), are run up to four ways in one
process, interleaved when repeated:

- **loop**: ``run_trial`` called directly, one trial after another (no Ray, no MLflow);
- **two processes**: two plain processes side by side, each running half the trials through
  ``run_trial`` (no Ray, no MLflow): on 2 cores, the most any scheduler can get;
- **logged** (only when asked): the same two processes, each trial logged to its own MLflow
  child run in a fresh sqlite store as a sweep logs it (no Ray, no Tune): against **two** it
  prices the runs themselves, against **ray** what Ray and Tune add;
- **ray**: ``run_study`` on a fresh local Ray runtime, 1 CPU per trial (so two at once on two
  cores), with everything a sweep does: MLflow sqlite child runs, Tune reports and
  checkpoints, the runtime's own start-up.

All run each trial with one torch thread (what a 1-CPU Ray trial uses) and at the same CPU
priority: Ray runs trial workers at nice 15 (``RAY_worker_niceness``), so on a machine shared
with other work a process at nice 0 would win cores the Ray trials lose; the plain ways
therefore run in child processes at the same niceness. Throughput is trials / wall time, end
to end: the plain ways from spawning their processes (interpreter, torch import, data) to
their end, the study from ``run_study``'s call (Ray's start-up included) to its return; and
in steady state: the plain ways from their first trial's start, the study from its first
trial run's MLflow start to its last one's end. Targets: ray / two processes >= 0.90 (end to
end), loop / ray >= 1.8x. With a GPU it also compares trials per hour with 4 trials sharing
one GPU (resources.gpu 0.25) against one trial at a time holding it (gpu 1) (target >= 3x).

    .venv/bin/python bench/parallel.py [--trial-seconds 30] [--trials 4] [--repeats 1]
        [--ways loop two logged ray] [--spec search_spaces/default.yaml] [--json FILE]

Measured (this 2-core machine, quiet, --trial-seconds 15 --repeats 2): two processes 29.3 s,
the loop 53.2 s (1.82x), the study 41.8 s: ray / two processes 0.70 end to end, 0.93 steady;
the study's fixed start and end 12.9 s (5.6 s to its parent run, 5.8 s to its first trial
run, 1.4 s to shut Ray down) (README, Benchmarks). A longer study, ``--trials 8
--trial-seconds 30 --ways two ray`` (a later stop): two processes 150.4 s, the study 168.6 s:
0.89 end to end, 0.99 steady. The default study, ``--spec search_spaces/default.yaml --ways
two ray``: two processes 278.8 s, the study 317.3 s: 0.88 end to end, 0.91 steady (0.86-0.87
and 0.89-0.90 in a second run). Its 150 MLP trials, ``--ways two logged ray --repeats 2`` on a
~3x slower machine: logged / two 0.90 end to end (0.97 steady), ray / logged 0.97 (0.97) in
the first repeat, the second drifting (0.83, 0.84): MLflow's runs, mostly their start (a fresh
store, MLflow's import), are more of the gap than Ray and Tune.
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))   # this checkout's study/, not an installed one


def bench_spec(epochs: int, data_root: Path, size: int, trials: int = 4, gpu: float = 0.0,
               cpu: float = 1.0):
    """The default study cut down to ``trials`` equal MLP trials (seeds 0, 1, ...)."""
    from study.spec import parse_spec

    raw = yaml.safe_load((ROOT / "search_spaces" / "default.yaml").read_text())
    raw.update(name="bench-parallel", epochs=epochs, lr=[0.1], batch_size=[32],
               seeds=list(range(trials)),
               models=[m for m in raw["models"] if m["name"] == "mlp"],
               families={"sgd": raw["families"]["sgd"]},
               resources={"cpu": cpu, "gpu": gpu})
    raw["families"]["sgd"] = {**raw["families"]["sgd"], "variants": ["momentum"]}
    raw["dataset"] = {**raw["dataset"], "root": str(data_root), "size": size}
    return parse_spec(raw)


def seconds_per_epoch(data_root: Path, size: int) -> float:
    """One epoch of one trial in the loop (the data is generated and cached first)."""
    from study.trial import load_splits, run_trial

    spec = bench_spec(100, data_root, size)
    load_splits(spec.dataset)
    start = time.perf_counter()
    run_trial(spec.trial_config(spec.trials()[0]), stop_after=2)
    return (time.perf_counter() - start) / 2


def load_trials(source: tuple):
    """The spec a way runs: ("bench", bench_spec's arguments) or ("file", a spec file), its
    dataset root made absolute as a sweep makes it (relative to the working folder)."""
    from study.spec import load_spec

    if source[0] == "bench":
        return bench_spec(*source[1])
    spec = load_spec(source[1])
    return spec.model_copy(update={"dataset": spec.dataset.model_copy(
        update={"root": str(Path(spec.dataset.root).resolve())})})


def _plain(source: tuple, counter, barrier, queue, tracking: dict | None = None) -> None:
    """Trials of the spec, each taken from the shared ``counter`` as the process is free (as
    Tune hands them out: trials of unequal length keep both processes busy), at the niceness
    Ray gives its trial workers, 1 torch thread; puts (first start, end) on ``queue``. With
    ``tracking`` ({"uri", "experiment_id", "parent_run_id"}) each trial is logged to its own
    MLflow child run as a sweep's trial is (``TrialRun``: created, metrics in one write at
    the end with its phases' seconds, ended), without Ray or Tune."""
    import torch

    from study.trial import Phases, run_trial

    os.nice(int(os.environ.get("RAY_worker_niceness", "15")) - os.nice(0))
    torch.set_num_threads(1)
    spec = load_trials(source)
    points = spec.trials()
    if tracking:
        from study.tracking import TrialRun, client_for
        from study.trainable import dataset_identity, end_run, run_tags

        client_for(tracking["uri"])      # the store opened once per process, as a Ray worker does
    barrier.wait()                       # side by side: both start their trials together
    start = time.time()
    while True:
        with counter.get_lock():
            i, counter.value = counter.value, counter.value + 1
        if i >= len(points):
            break
        cfg = spec.trial_config(points[i])
        if not tracking:
            run_trial(cfg)
            continue
        run = TrialRun(**tracking, trial_id=f"plain-{i:05d}", params=cfg.params(),
                       tags=run_tags(cfg), dataset=dataset_identity(cfg.dataset))
        phases = Phases()
        end_run(run, run_trial(cfg, log=run.log, phases=phases), phases)
    queue.put((start, time.time()))


def run_plain(source: tuple, processes: int, workdir: Path | None = None) -> tuple[float, float]:
    """(end to end: spawn -> last process done, steady: first trial start -> last end) of
    the spec's trials run by ``processes`` plain processes side by side; with ``workdir``,
    each trial logged to MLflow in a fresh sqlite store there (its creation on the clock, as
    a sweep's is)."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    queue, barrier, counter = ctx.Queue(), ctx.Barrier(processes), ctx.Value("i", 0)
    start = time.perf_counter()
    tracking = None
    if workdir is not None:
        from study.tracking import open_store, study_parent

        workdir.mkdir(parents=True, exist_ok=True)
        uri = f"sqlite:///{workdir / 'mlflow.db'}"
        exp = open_store(uri, "bench-parallel-logged")
        tracking = {"uri": uri, "experiment_id": exp,
                    "parent_run_id": study_parent(uri, exp, "bench-parallel-logged", None, {}, {})}
    children = [ctx.Process(target=_plain, args=(source, counter, barrier, queue, tracking))
                for _ in range(processes)]
    for child in children:
        child.start()
    spans = [queue.get() for _ in children]
    for child in children:
        child.join()
    wall = time.perf_counter() - start
    return wall, max(end for _, end in spans) - min(begin for begin, _ in spans)


STAGES = ("to parent run (store, data, Ray start)", "parent run -> first trial run",
          "trials' span", "last trial run -> parent's end", "parent's end -> Ray shut down")


def run_ray(spec, workdir: Path, stages: list | None = None) -> tuple[float, float]:
    """(wall seconds of the whole study incl. Ray start-up, first trial start -> last end);
    ``stages`` gets the seconds of each of STAGES (from the runs' MLflow times)."""
    import ray
    from mlflow.tracking import MlflowClient

    from study.tune import run_study

    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    workdir.mkdir(parents=True, exist_ok=True)
    start, t0 = time.perf_counter(), time.time()
    try:
        result = run_study(spec, None, storage=str(workdir / "results"), tracking_uri=uri)
    finally:
        ray.shutdown()
    wall = time.perf_counter() - start
    # every trial ended by itself (the same ones diverge in every way: training is seeded)
    ended = sum(result.statuses.get(s, 0) for s in ("finished", "diverged"))
    assert ended == spec.num_trials(), result.statuses
    client = MlflowClient(uri)
    runs = client.search_runs([result.experiment_id],
                              f"tags.mlflow.parentRunId = '{result.parent_run_id}'")
    parent = client.get_run(result.parent_run_id).info
    first = min(r.info.start_time for r in runs) / 1e3
    last = max(r.info.end_time for r in runs) / 1e3
    marks = [t0, parent.start_time / 1e3, first, last, parent.end_time / 1e3, t0 + wall]
    if stages is not None:
        stages.append([b - a for a, b in itertools.pairwise(marks)])
    return wall, last - first


def trials_per_hour(spec, workdir: Path) -> float:
    wall, _ = run_ray(spec, workdir)
    return spec.num_trials() / wall * 3600


# figure -> (numerator, denominator) of wall times: throughput of the denominator's way
# relative to the numerator's
RATIOS = {"ray_vs_two": ("two", "ray"), "ray_vs_two_steady": ("two_steady", "ray_steady"),
          "ray_vs_logged": ("logged", "ray"),
          "ray_vs_logged_steady": ("logged_steady", "ray_steady"),
          "logged_vs_two": ("two", "logged"),
          "logged_vs_two_steady": ("two_steady", "logged_steady"),
          "speedup": ("loop", "ray"), "speedup_trials_span": ("loop_steady", "ray_steady"),
          "two_speedup": ("loop", "two"), "two_speedup_steady": ("loop_steady", "two_steady")}


# (end-to-end figure, steady figure, what it is) as report prints them
RATIO_LINES = (
    ("ray_vs_two", "ray_vs_two_steady", "ray / two processes (throughput; target >= 0.90)"),
    ("logged_vs_two", "logged_vs_two_steady",
     "two processes logging to MLflow / two plain (what the runs cost)"),
    ("ray_vs_logged", "ray_vs_logged_steady",
     "ray / two processes logging to MLflow (what Ray and Tune cost)"),
    ("speedup", "speedup_trials_span", "ray over the loop (target >= 1.8x end to end)"),
    ("two_speedup", "two_speedup_steady", "two processes over the loop"))


def report(f: dict) -> None:
    n = f["trials"]
    print("| way | wall s (end to end) | steady s | trials/hour (end to end) |\n|---|---|---|---|")
    for way, label in (("loop", "loop, one after another"), ("two", "two plain processes"),
                       ("logged", "two plain processes, MLflow runs"),
                       ("ray", "ray study, 2 workers")):
        if f"{way}_s" in f:
            print(f"| {label} | {f[way + '_s']:.1f} | {f[way + '_steady_s']:.1f} | "
                  f"{n / f[way + '_s'] * 3600:.0f} |")
    if "ray_stages_s" in f:
        print("the ray study's wall time: " + ", ".join(f"{k} {v:.1f} s"
                                                        for k, v in f["ray_stages_s"].items()))
    for key, steady, label in RATIO_LINES:
        if key in f:
            print(f"{label}: {f[key]:.3f} end to end, {f[steady]:.3f} steady")
    print(f"1-min load average before/after: {f['load_avg_1min'][0]:.1f}/"
          f"{f['load_avg_1min'][1]:.1f} on {os.cpu_count()} cores")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--trial-seconds", type=float, default=30.0,
                    help="about how long one trial should take in the loop")
    ap.add_argument("--trials", type=int, default=4, help="trials (an even number)")
    ap.add_argument("--size", type=int, default=70000, help="MNIST-1D examples generated")
    ap.add_argument("--repeats", type=int, default=1, help="interleaved repeats of the ways")
    ap.add_argument("--ways", nargs="+", default=["loop", "two", "ray"],
                    choices=["loop", "two", "logged", "ray"],
                    help="run only these (the loop gives the speed-ups; ray against two "
                    "processes is the target; logged: two processes logging each trial to "
                    "MLflow, which splits the gap into MLflow's part and Ray's)")
    ap.add_argument("--spec", help="run this study's trials (e.g. search_spaces/default.yaml) "
                    "instead of --trials equal ones (--trial-seconds, --size unused)")
    ap.add_argument("--json", help="write the figures to this file")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="gs-bench-", dir="/tmp"))
    os.environ.setdefault("RAY_TMPDIR", str(tmp / "ray"))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT),
                                                             os.environ.get("PYTHONPATH")]))
    if args.spec:                    # a whole study as written, e.g. the default one
        source = ("file", args.spec)
        spec = load_trials(source)
        from study.trial import load_splits

        load_splits(spec.dataset)        # generated once, before any way's clock starts
        f0 = {"spec": args.spec, "trials": spec.num_trials()}
        print(f"{args.spec}: {spec.num_trials()} trials; cores: {os.cpu_count()}")
    else:
        data_root = ROOT / "data"
        per_epoch = seconds_per_epoch(data_root, args.size)
        epochs = max(1, math.ceil(args.trial_seconds / per_epoch))
        source = ("bench", (epochs, data_root, args.size, args.trials))
        spec = load_trials(source)
        f0 = {"trials": args.trials, "epochs": epochs, "size": args.size,
              "seconds_per_epoch": per_epoch}
        print(f"{args.trials} trials x {epochs} epochs (~{per_epoch:.2f} s/epoch, "
              f"~{epochs * per_epoch:.0f} s/trial alone); cores: {os.cpu_count()}")
    load_before = os.getloadavg()[0]

    walls: dict[str, list[float]] = {k: [] for k in ("loop", "two", "logged", "ray")
                                     if k in args.ways}
    steady: dict[str, list[float]] = {k: [] for k in walls}
    stages: list[list[float]] = []
    for rep in range(args.repeats):
        order = list(walls) if rep % 2 == 0 else list(reversed(walls))
        for way in order:
            if way == "ray":
                wall, span = run_ray(spec, tmp / f"ray{rep}", stages)
            else:
                wall, span = run_plain(source, 1 if way == "loop" else 2,
                                       tmp / f"logged{rep}" if way == "logged" else None)
            walls[way].append(wall)
            steady[way].append(span)
            print(f"  {way}: {wall:.1f} s end to end, {span:.1f} s steady", flush=True)
    f = {**f0, "repeats": args.repeats,
         **{f"{k}_s": statistics.median(v) for k, v in walls.items()},
         **{f"{k}_steady_s": statistics.median(v) for k, v in steady.items()}}
    if stages:
        f["ray_stages_s"] = dict(zip(STAGES, map(statistics.median, zip(*stages))))
    for key, (num, den) in RATIOS.items():
        if f"{num}_s" in f and f"{den}_s" in f:
            f[key] = f[f"{num}_s"] / f[f"{den}_s"]
    # Other processes on the machine take cores from the parallel trials: say how many.
    f["load_avg_1min"] = [load_before, os.getloadavg()[0]]
    report(f)

    if torch.cuda.is_available() and not args.spec:
        epochs, data_root = f["epochs"], ROOT / "data"
        shared = trials_per_hour(bench_spec(epochs, data_root, args.size, 4, gpu=0.25),
                                 tmp / "gpu-shared")
        whole = trials_per_hour(bench_spec(epochs, data_root, args.size, 4, gpu=1.0),
                                tmp / "gpu-whole")
        f.update(gpu_trials_per_hour_quarter=shared, gpu_trials_per_hour_whole=whole,
                 gpu_ratio=shared / whole)
        print(f"GPU trials/hour: 4 x 0.25 GPU {shared:.0f}, 1 x 1 GPU {whole:.0f}, "
              f"ratio {shared / whole:.2f}x (target >= 3x)")
    else:
        print("no GPU: the fractional-GPU comparison is skipped")

    if args.json:
        Path(args.json).write_text(json.dumps(f, indent=1))


if __name__ == "__main__":
    main()
