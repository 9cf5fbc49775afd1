"""What fraction of a default-study trial the variance measurement takes.

Runs the default study's trial loop (8 epochs of ⌊3600/B⌋ steps on MNIST-1D shapes: inputs
(1, 40), 10 classes) for the MLP 40→100→100→10 and the CNN1d 25-25-25, at batch sizes
32/128/512, three ways: no probe, the probe at the default schedule (every 50 iterations,
10 batches) and the same with histograms on. The three are interleaved and repeated; the
overhead is the median of (T_probe − T_none) / T_probe, i.e. the share of the trial's
training-loop time spent measuring (per-epoch evaluation is left out, so this is an upper
bound on the share of a real trial). It also prints the cost of one measurement in training
steps and the sparsest `every` (at 10 batches) and the most `batches` (at every 50) that keep
the share at or under the target.

    .venv/bin/python bench/variance_overhead.py [--reps 5] [--json FILE] [--device cpu]
"""
from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import time

import torch
import torch.nn.functional as F

from study.data import DataSplit, epoch_generator
from study.models import build_model
from study.optim import make_optimizer
from study.spec import MeasureSpec
from study.variance import VarianceProbe

TRAIN, EPOCHS, TARGET = 3600, 8, 0.10
MODELS = {"mlp": {"widths": [100, 100]}, "cnn": {"channels": [25, 25, 25]}}
SETUPS = {"none": None,
          "measure": MeasureSpec(every=50, batches=10, histograms=False),
          "measure+hist": MeasureSpec(every=50, batches=10, histograms=True)}


def loss_fn(logits, y):
    return F.cross_entropy(logits, y, reduction="none")


def trial(model_name: str, family: str, bs: int, measure: MeasureSpec | None, data: DataSplit,
          device: str) -> tuple[float, int, int]:
    """(seconds, measurements, histograms) of one default-length trial's training loop."""
    torch.manual_seed(0)
    model = build_model(model_name, (1, 40), 10, **MODELS[model_name]).to(device)
    opt = make_optimizer(family, model, loss_fn, 0.05)
    steps = len(data) // bs
    probe = VarianceProbe(measure, data, bs, 0, EPOCHS * steps) if measure else None
    periodic, it, n_meas, n_hist = opt.periodic(), 0, 0, 0
    _sync(device)
    t0 = time.perf_counter()
    for epoch in range(EPOCHS):
        from study.optim import Context
        ctx = Context(model, loss_fn, data, bs, it, epoch, epoch_generator(0, epoch, -1))
        for idx in opt.sampler(len(data), bs, epoch_generator(0, epoch)):
            ctx.iteration = it
            for work in periodic:
                if work.due("iter", it):
                    work.run(ctx)
            if probe is not None:
                if probe.due(it):
                    probe.measure(opt, it)
                    n_meas += 1
                if probe.histogram_due(it):
                    probe.record_histogram(opt, it)
                    n_hist += 1
            opt.step(opt.direction(data.batch(idx)))
            it += 1
        for work in periodic:
            if work.due("epoch", epoch + 1):
                work.run(ctx)
    _sync(device)
    return time.perf_counter() - t0, n_meas, n_hist


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--families", default="sgd", help="comma-separated, e.g. sgd,kfac")
    ap.add_argument("--batch-sizes", default="32,128,512")
    ap.add_argument("--json", help="write the figures to this file")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    data = DataSplit(torch.randn(TRAIN, 1, 40, generator=g),
                     torch.randint(0, 10, (TRAIN,), generator=g)).to(args.device)
    cells = [(m, f, int(b)) for m in MODELS for f in args.families.split(",")
             for b in args.batch_sizes.split(",")]
    times: dict[tuple, dict[str, list[float]]] = {c: {s: [] for s in SETUPS} for c in cells}
    counts: dict[tuple, dict[str, tuple[int, int]]] = {c: {} for c in cells}
    for c in cells:                                       # warm-up (allocator, first calls)
        trial(*c, SETUPS["measure+hist"], data, args.device)
    order = random.Random(0)
    for _ in range(args.reps):
        for c in cells:
            setups = list(SETUPS)
            order.shuffle(setups)                        # interleaved, in varying order
            for s in setups:
                secs, n_meas, n_hist = trial(*c, SETUPS[s], data, args.device)
                times[c][s].append(secs)
                counts[c][s] = (n_meas, n_hist)

    rows = []
    header = (f"{'model':5} {'family':6} {'B':>4} {'iters':>5} {'meas':>4} {'none s':>7} "
              f"{'probe s':>8} {'share':>6} {'+hist s':>8} {'share':>6} {'1 meas=steps':>12} "
              f"{'every@10b':>9} {'batches@50':>10}")
    print(f"device={args.device} threads={args.threads} reps={args.reps} "
          f"(median of interleaved repeats; share = (T_probe - T_none) / T_probe)")
    print(header)
    for (m, f, b), t in times.items():
        iters = EPOCHS * (TRAIN // b)
        n_meas = counts[(m, f, b)]["measure"][0]
        n_hist = counts[(m, f, b)]["measure+hist"][1]
        base, probe, hist = (statistics.median(t[s]) for s in SETUPS)
        share = [statistics.median((p - n) / p for p, n in zip(t[s], t["none"]))
                 for s in ("measure", "measure+hist")]
        step_s = base / iters
        meas_s = max(probe - base, 0.0) / n_meas
        meas_steps = meas_s / step_s
        # share(every) = (c/every) / (1 + c/every) <= TARGET  <=>  every >= c (1-T)/T
        every_needed = math.ceil(meas_steps * (1 - TARGET) / TARGET)
        batches_ok = math.floor(10 * 50 * TARGET / ((1 - TARGET) * meas_steps)) if meas_steps else None
        rows.append({"model": m, "family": f, "batch_size": b, "iterations": iters,
                     "measurements": n_meas, "histograms": n_hist,
                     "expected_measurements_floor_iters_over_50": iters // 50,
                     "t_none_s": base, "t_probe_s": probe, "t_probe_hist_s": hist,
                     "share_probe": share[0], "share_probe_hist": share[1],
                     "measurement_in_steps": meas_steps, "every_for_target_at_10_batches":
                     every_needed, "batches_for_target_at_every_50": batches_ok})
        print(f"{m:5} {f:6} {b:4d} {iters:5d} {n_meas:4d} {base:7.3f} {probe:8.3f} "
              f"{share[0]:6.1%} {hist:8.3f} {share[1]:6.1%} {meas_steps:12.1f} "
              f"{every_needed:9d} {batches_ok!s:>10}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"device": args.device, "threads": args.threads, "reps": args.reps,
                       "target_share": TARGET, "rows": rows}, fh, indent=2)


if __name__ == "__main__":
    main()
