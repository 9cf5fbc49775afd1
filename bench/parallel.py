"""What running trials as a Ray study buys over running them one after another.

The same trials (the default study's MLP 40-100-100-10 with SGD+momentum and the default
variance measurement, four seeds at lr 0.1, batch 32, on MNIST-1D generated at ``--size``
examples, 70k by default, so that epochs are long (~1 s) rather than many; epochs chosen so one
trial takes about ``--trial-seconds`` here) are run two ways in one process, interleaved when
repeated:

- **loop**: ``run_trial`` called directly, one trial after another (no Ray, no MLflow);
- **ray**: ``run_study`` on a fresh local Ray runtime, 1 CPU per trial (so two at once on two
  cores), with everything a sweep does: MLflow sqlite child runs, per-epoch Tune reports and
  checkpoints, the runtime's own start-up.

Both run each trial with one torch thread (what a 1-CPU Ray trial uses) and at the same CPU
priority: Ray runs trial workers at nice 15 (``RAY_worker_niceness``), so on a machine shared
with other work a loop at nice 0 would win cores the Ray trials lose; the loop therefore runs
in a child process at the same niceness. The speedup is
loop wall / ray wall, end to end (target >= 1.8x on a 2-core machine). With a GPU it also
compares trials per hour with 4 trials sharing one GPU (resources.gpu 0.25) against one trial
at a time holding it (gpu 1) (target >= 3x).

    .venv/bin/python bench/parallel.py [--trial-seconds 30] [--repeats 1] [--json FILE]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
TRIALS = 4


def bench_spec(epochs: int, data_root: Path, size: int, gpu: float = 0.0, cpu: float = 1.0):
    """The default study cut down to four equal MLP trials (seeds 0-3)."""
    from study.spec import parse_spec

    raw = yaml.safe_load((ROOT / "search_spaces" / "default.yaml").read_text())
    raw.update(name="bench-parallel", epochs=epochs, lr=[0.1], batch_size=[32],
               seeds=list(range(TRIALS)),
               models=[m for m in raw["models"] if m["name"] == "mlp"],
               families={"sgd": raw["families"]["sgd"]},
               resources={"cpu": cpu, "gpu": gpu})
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


def run_loop(spec) -> float:
    from study.trial import run_trial

    start = time.perf_counter()
    for point in spec.trials():
        run_trial(spec.trial_config(point))
    return time.perf_counter() - start


def _loop_at_worker_priority(epochs: int, data_root: Path, size: int, queue) -> None:
    import torch

    os.nice(int(os.environ.get("RAY_worker_niceness", "15")) - os.nice(0))
    torch.set_num_threads(1)
    queue.put(run_loop(bench_spec(epochs, data_root, size)))


def run_loop_niced(epochs: int, data_root: Path, size: int) -> float:
    """``run_loop`` in a child process at the niceness Ray gives its trial workers."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    child = ctx.Process(target=_loop_at_worker_priority, args=(epochs, data_root, size, queue))
    child.start()
    wall = queue.get()
    child.join()
    return wall


def run_ray(spec, workdir: Path) -> tuple[float, float]:
    """(wall seconds of the whole study incl. Ray start-up, first trial start -> last end)."""
    import ray
    from mlflow.tracking import MlflowClient

    from study.tune import run_study

    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    start = time.perf_counter()
    try:
        result = run_study(spec, None, storage=str(workdir / "results"), tracking_uri=uri,
                           report=False)
    finally:
        ray.shutdown()
    wall = time.perf_counter() - start
    assert result.statuses.get("finished") == TRIALS, result.statuses
    runs = MlflowClient(uri).search_runs([result.experiment_id],
                                         f"tags.mlflow.parentRunId = '{result.parent_run_id}'")
    span = (max(r.info.end_time for r in runs) - min(r.info.start_time for r in runs)) / 1000
    return wall, span


def trials_per_hour(spec, workdir: Path) -> float:
    wall, _ = run_ray(spec, workdir)
    return TRIALS / wall * 3600


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--trial-seconds", type=float, default=30.0,
                    help="about how long one trial should take in the loop")
    ap.add_argument("--size", type=int, default=70000, help="MNIST-1D examples generated")
    ap.add_argument("--repeats", type=int, default=1, help="interleaved loop/ray repeats")
    ap.add_argument("--json", help="write the figures to this file")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="gs-bench-", dir="/tmp"))
    os.environ.setdefault("RAY_TMPDIR", str(tmp / "ray"))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT),
                                                             os.environ.get("PYTHONPATH")]))
    data_root = ROOT / "data"
    per_epoch = seconds_per_epoch(data_root, args.size)
    epochs = max(1, math.ceil(args.trial_seconds / per_epoch))
    spec = bench_spec(epochs, data_root, args.size)
    load_before = os.getloadavg()[0]
    print(f"{TRIALS} trials x {epochs} epochs (~{per_epoch:.2f} s/epoch, "
          f"~{epochs * per_epoch:.0f} s/trial in the loop); cores: {os.cpu_count()}")

    loop, ray_wall, ray_span = [], [], []
    for rep in range(args.repeats):
        order = ("loop", "ray") if rep % 2 == 0 else ("ray", "loop")
        for way in order:
            if way == "loop":
                loop.append(run_loop_niced(epochs, data_root, args.size))
            else:
                wall, span = run_ray(spec, tmp / f"ray{rep}")
                ray_wall.append(wall)
                ray_span.append(span)
    figures = {"trials": TRIALS, "epochs": epochs, "size": args.size,
               "seconds_per_epoch": per_epoch,
               "loop_s": statistics.median(loop), "ray_s": statistics.median(ray_wall),
               "ray_trials_span_s": statistics.median(ray_span), "repeats": args.repeats}
    figures["speedup"] = figures["loop_s"] / figures["ray_s"]
    # Other processes on the machine take cores from the two parallel trials: say how many.
    figures["load_avg_1min"] = [load_before, os.getloadavg()[0]]
    figures["speedup_trials_span"] = figures["loop_s"] / figures["ray_trials_span_s"]
    print(f"| way | wall s |\n|---|---|\n| loop (one after another) | {figures['loop_s']:.1f} |\n"
          f"| ray study, 2 at once (end to end) | {figures['ray_s']:.1f} |\n"
          f"| ray study, first trial start -> last trial end | "
          f"{figures['ray_trials_span_s']:.1f} |")
    print(f"speedup (end to end): {figures['speedup']:.2f}x (target >= 1.8x); "
          f"on the trials' span: {figures['speedup_trials_span']:.2f}x; 1-min load average "
          f"before/after: {load_before:.1f}/{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")

    if torch.cuda.is_available():
        shared = trials_per_hour(bench_spec(epochs, data_root, args.size, gpu=0.25),
                                 tmp / "gpu-shared")
        whole = trials_per_hour(bench_spec(epochs, data_root, args.size, gpu=1.0),
                                tmp / "gpu-whole")
        figures.update(gpu_trials_per_hour_quarter=shared, gpu_trials_per_hour_whole=whole,
                       gpu_ratio=shared / whole)
        print(f"GPU trials/hour: 4 x 0.25 GPU {shared:.0f}, 1 x 1 GPU {whole:.0f}, "
              f"ratio {shared / whole:.2f}x (target >= 3x)")
    else:
        print("no GPU: the fractional-GPU comparison is skipped")

    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
