"""What fraction of a default-study trial the variance measurement takes.

Runs the default study's trial loop (its epochs of ⌊3600/B⌋ steps on MNIST-1D shapes: inputs
(1, 40), 10 classes) for the MLP 40→100→100→10 and the CNN1d 25-25-25, at batch sizes
32/128/512, three ways: no probe, the probe at the default study's schedule
(search_spaces/default.yaml: `measure.every`, `measure.batches`) and the same with histograms
on. The three are interleaved and repeated; the
overhead is the median of (T_probe − T_none) / T_probe, i.e. the share of the trial's
training-loop time spent measuring (per-epoch evaluation is left out, so this is an upper
bound on the share of a real trial). It also prints the cost of one measurement in training
steps and the sparsest `every` (at the default batches) and the most `batches` (at the default
`every`) that keep the share at or under the target.

    .venv/bin/python bench/variance_overhead.py [--reps 5] [--json FILE] [--device cpu]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from study.data import DataSplit, epoch_generator
from study.models import build_model
from study.optim import make_optimizer
from study.spec import load_spec
from study.trial import probe_step, scheduled_work
from study.variance import ProbeSettings, VarianceProbe

DEFAULT_STUDY = load_spec(Path(__file__).resolve().parents[1] / "search_spaces" / "default.yaml")
DEFAULT = DEFAULT_STUDY.measure.settings()
TRAIN, EPOCHS, TARGET = 3600, DEFAULT_STUDY.epochs, 0.10
EVERY, BATCHES = DEFAULT.every, DEFAULT.batches
MODELS = {"mlp": {"widths": [100, 100]}, "cnn": {"channels": [25, 25, 25]}}
SETUPS = {"none": None,
          "measure": dataclasses.replace(DEFAULT, histograms=False),
          "measure+hist": dataclasses.replace(DEFAULT, histograms=True)}


def loss_fn(logits, y):
    return F.cross_entropy(logits, y, reduction="none")


def trial(model_name: str, family: str, bs: int, measure: ProbeSettings | None, data: DataSplit,
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
            scheduled_work(periodic, ctx, it)
            n_meas += probe is not None and probe.due(it)
            n_hist += probe is not None and probe.histogram_due(it)
            probe_step(probe, opt, it)
            opt.step(opt.direction(data.batch(idx)))
            it += 1
        scheduled_work(periodic, ctx, epoch + 1, "epoch")
    _sync(device)
    return time.perf_counter() - t0, n_meas, n_hist


def unit_costs(model_name: str, family: str, bs: int, data: DataSplit, device: str,
               rounds: int) -> tuple[float, float, float]:
    """Median seconds of (one training step, one measurement, one histogram), timed in
    interleaved rounds of 50 steps / 1 measurement / 1 histogram at the same weights:
    robust to load spikes where whole-trial timings are not."""
    torch.manual_seed(0)
    model = build_model(model_name, (1, 40), 10, **MODELS[model_name]).to(device)
    opt = make_optimizer(family, model, loss_fn, 0.05)
    steps = len(data) // bs
    probe = VarianceProbe(SETUPS["measure+hist"], data, bs, 0, EPOCHS * steps)
    from study.optim import Context
    ctx = Context(model, loss_fn, data, bs, 0, 0, epoch_generator(0, 0, -1))
    scheduled_work(opt.periodic(), ctx, 0)   # e.g. a snapshot a direction needs
    batches = [data.batch(idx) for idx in opt.sampler(len(data), bs, epoch_generator(0, 0))]
    step_t, meas_t, hist_t = [], [], []

    def timed(fn) -> float:
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        return time.perf_counter() - t0

    def fifty_steps():
        for i in range(50):
            opt.step(opt.direction(batches[i % len(batches)]))

    for r in range(rounds + 1):
        s = timed(fifty_steps) / 50
        m = timed(lambda r=r: probe.measure(opt, r))
        h = timed(lambda r=r: probe.record_histogram(opt, r))
        if r:                                             # round 0 warms up
            step_t.append(s)
            meas_t.append(m)
            hist_t.append(h)
    return statistics.median(step_t), statistics.median(meas_t), statistics.median(hist_t)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=5, help="whole-trial repeats per setup")
    ap.add_argument("--rounds", type=int, default=15, help="unit-cost rounds per cell")
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
    print(f"device={args.device} threads={args.threads} whole-trial reps={args.reps} "
          f"unit-cost rounds={args.rounds}; default schedule: every {EVERY}, {BATCHES} "
          f"batches, {DEFAULT.histogram_points} histograms; {EPOCHS} epochs x {TRAIN}/B steps")
    rows = [whole_trials(c, data, args) | projected(c, data, args) for c in cells]
    print("\n(1) whole default trials, interleaved; share = median (T_probe - T_none) / T_probe")
    print(f"{'model':5} {'family':6} {'B':>4} {'iters':>5} {'meas':>4} {'iters//ev':>9} "
          f"{'hists':>5} {'none s':>7} {'probe s':>8} {'share':>6} {'+hist s':>8} {'share':>6}")
    for r in rows:
        print(f"{r['model']:5} {r['family']:6} {r['batch_size']:4d} {r['iterations']:5d} "
              f"{r['measurements']:4d} {r['iterations'] // EVERY:9d} {r['histograms']:5d} "
              f"{r['t_none_s']:7.3f} {r['t_probe_s']:8.3f} {r['share_probe']:6.1%} "
              f"{r['t_probe_hist_s']:8.3f} {r['share_probe_hist']:6.1%}")
    print("\n(2) unit costs (medians of interleaved rounds) and the share they imply for a "
          f"default trial;\n    every@{BATCHES}b: sparsest `every` meeting the 10% target at "
          f"{BATCHES} batches; batches@{EVERY}: most batches meeting it at every {EVERY}")
    print(f"{'model':5} {'family':6} {'B':>4} {'step ms':>8} {'meas ms':>8} {'hist ms':>8} "
          f"{'meas/step':>9} {'share':>6} {'+hist':>6} {'every@Nb':>9} {'batches@ev':>10}")
    for r in rows:
        print(f"{r['model']:5} {r['family']:6} {r['batch_size']:4d} {r['step_ms']:8.3f} "
              f"{r['measure_ms']:8.2f} {r['histogram_ms']:8.2f} {r['measure_in_steps']:9.1f} "
              f"{r['projected_share']:6.1%} {r['projected_share_hist']:6.1%} "
              f"{r['every_for_target']:9d} "
              f"{r['batches_for_target']:10d}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"device": args.device, "threads": args.threads, "reps": args.reps,
                       "rounds": args.rounds, "target_share": TARGET, "rows": rows}, fh,
                      indent=2)


def whole_trials(cell: tuple, data: DataSplit, args) -> dict:
    """Setups interleaved in a shuffled order per repeat, after one warm-up trial."""
    m, f, b = cell
    trial(m, f, b, SETUPS["measure+hist"], data, args.device)
    times: dict[str, list[float]] = {s: [] for s in SETUPS}
    counts: dict[str, tuple[int, int]] = {}
    order = random.Random(b)
    for _ in range(args.reps):
        setups = list(SETUPS)
        order.shuffle(setups)
        for s in setups:
            secs, n_meas, n_hist = trial(m, f, b, SETUPS[s], data, args.device)
            times[s].append(secs)
            counts[s] = (n_meas, n_hist)
    share = {s: statistics.median((p - n) / p for p, n in zip(times[s], times["none"]))
             for s in ("measure", "measure+hist")}
    return {"model": m, "family": f, "batch_size": b, "iterations": EPOCHS * (TRAIN // b),
            "measurements": counts["measure"][0], "histograms": counts["measure+hist"][1],
            "t_none_s": statistics.median(times["none"]),
            "t_probe_s": statistics.median(times["measure"]),
            "t_probe_hist_s": statistics.median(times["measure+hist"]),
            "share_probe": share["measure"], "share_probe_hist": share["measure+hist"]}


def projected(cell: tuple, data: DataSplit, args) -> dict:
    m, f, b = cell
    step, meas, hist = unit_costs(m, f, b, data, args.device, args.rounds)
    iters = EPOCHS * (TRAIN // b)
    n_meas = math.ceil(iters / EVERY)         # iterations 0, every, ... < iters
    train_s, meas_s = iters * step, n_meas * meas
    hist_s = DEFAULT.histogram_points * hist
    in_steps = meas / step
    # share(every) = (c/every) / (1 + c/every) <= T  <=>  every >= c (1 - T) / T
    every = math.ceil(in_steps * (1 - TARGET) / TARGET)
    # a measurement of k batches costs about k/BATCHES of one of BATCHES batches
    batches = math.floor(BATCHES * EVERY * TARGET / ((1 - TARGET) * in_steps))
    return {"step_ms": step * 1e3, "measure_ms": meas * 1e3, "histogram_ms": hist * 1e3,
            "measure_in_steps": in_steps,
            "projected_share": meas_s / (train_s + meas_s),
            "projected_share_hist": (meas_s + hist_s) / (train_s + meas_s + hist_s),
            "every_for_target": every, "batches_for_target": batches}


if __name__ == "__main__":
    main()
