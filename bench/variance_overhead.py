"""What fraction of a default-study trial the variance measurement takes.

Runs the default study's trial loop (its epochs of ⌊M/B⌋ steps, M = the default dataset's
training-set size, on MNIST-1D shapes: inputs (1, 40), 10 classes) for the default study's
models at its batch sizes, three ways: no probe, the probe at the default study's schedule
(search_spaces/default.yaml `measure:`; `--points / --every / --batches / --spacing` replace
it, e.g. `--every 100` for the old schedule) and the same with histograms on. The three are
interleaved and repeated; a cell's loop share is the median of (T_probe − T_none) / T_probe,
the share of the trial's training-loop time spent measuring (an upper bound on the share of
a real trial's wall time). The trial share adds what run_trial does besides the loop, timed
apart: the per-epoch evaluation of train / validation / test (3,600 / 400 / 1,000 examples)
and the initial training loss, T_eval; share = (T_probe − T_none) / (T_probe + T_eval).
Ray, MLflow and checkpointing are not counted (they would lower the share further).

The study-wide share weights each (model, family, batch size) cell by its number of trials
in the default study (over the families run: `--families`, sgd by default) and sums times,
not shares: Σ w (T_probe − T_none) / Σ w T_probe (+ T_eval), the share of the whole sweep's
training-loop (trial) time. A batch-512 trial is short (⌊M/512⌋ steps an epoch), so its high
own share weighs less than a batch-32 trial's.

Unit costs (one step, one measurement at several `batches`, one histogram, at the same
weights, in interleaved rounds) then project the study-wide share for other (points,
batches) pairs without running them.

    .venv/bin/python bench/variance_overhead.py [--reps 5] [--json FILE] [--device cpu]
        [--points P | --every K] [--batches N] [--spacing linear|log]
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import random
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from study.data import DataSplit, epoch_generator
from study.models import build_model
from study.optim import Context, make_optimizer
from study.spec import load_spec
from study.trial import evaluate, probe_step, scheduled_work
from study.variance import ProbeSettings, VarianceProbe, measurement_iterations

DEFAULT_STUDY = load_spec(Path(__file__).resolve().parents[1] / "search_spaces" / "default.yaml")
DEFAULT = DEFAULT_STUDY.measure.settings()
TRAIN, EPOCHS, TARGET = DEFAULT_STUDY.dataset.train_size(), DEFAULT_STUDY.epochs, 0.10
VAL, TEST = 400, 1000          # the default dataset's validation and test splits
MODELS = {m.name: m.options() for m in DEFAULT_STUDY.models}
# trials per (model, family, batch size) in the default study: the study-wide weights
WEIGHTS = collections.Counter((t["model"], t["family"], t["batch_size"])
                              for t in DEFAULT_STUDY.trials())
# each family runs as the default study's first arm of it (variant, options)
ARMS = {t["family"]: (t["variant"], t["options"]) for t in reversed(DEFAULT_STUDY.trials())}
PROJECT_POINTS = (4, 6, 8, 10, 12, 16, 20, 24)


def loss_fn(logits, y):
    return F.cross_entropy(logits, y, reduction="none")


def optimizer(family: str, model):
    """``family`` as the default study's first arm of it (lr 0.05 for all)."""
    variant, options = ARMS.get(family, (None, {}))
    return make_optimizer(family, model, loss_fn, 0.05, variant, **options)


def schedule(args) -> ProbeSettings:
    """The default study's measure settings, with the command line's replacements."""
    s = DEFAULT
    if args.points is not None:
        s = dataclasses.replace(s, points=args.points, every=None)
    if args.every is not None:
        s = dataclasses.replace(s, every=args.every, points=None)
    if args.batches is not None:
        s = dataclasses.replace(s, batches=args.batches)
    if args.spacing is not None:
        s = dataclasses.replace(s, spacing=args.spacing)
    return s


def count_measurements(s: ProbeSettings, iterations: int) -> int:
    if s.points:
        return len(measurement_iterations(iterations, s.points, s.spacing, s.start))
    return len(range(s.start, iterations, s.every)) if s.every else 0


def trial(model_name: str, family: str, bs: int, measure: ProbeSettings | None, data: DataSplit,
          device: str) -> tuple[float, float, int, int]:
    """(seconds, seconds inside the probe, measurements, histograms) of one default-length
    trial's training loop."""
    torch.manual_seed(0)
    model = build_model(model_name, (1, 40), 10, **MODELS[model_name]).to(device)
    opt = optimizer(family, model)
    steps = len(data) // bs
    probe = VarianceProbe(measure, data, bs, 0, EPOCHS * steps) if measure else None
    periodic, it, n_meas, n_hist, in_probe = opt.periodic(), 0, 0, 0, 0.0
    _sync(device)
    t0 = time.perf_counter()
    for epoch in range(EPOCHS):
        ctx = Context(model, loss_fn, data, bs, it, epoch, epoch_generator(0, epoch, -1))
        for idx in opt.sampler(len(data), bs, epoch_generator(0, epoch)):
            scheduled_work(periodic, ctx, it)
            if probe is not None and (probe.due(it) or probe.histogram_due(it)):
                n_meas += probe.due(it)
                n_hist += probe.histogram_due(it)
                _sync(device)
                t1 = time.perf_counter()
                probe_step(probe, opt, it)
                _sync(device)
                in_probe += time.perf_counter() - t1
            opt.step(opt.direction(data.batch(idx)))
            it += 1
        scheduled_work(periodic, ctx, epoch + 1, "epoch")
    _sync(device)
    return time.perf_counter() - t0, in_probe, n_meas, n_hist


def unit_costs(model_name: str, family: str, bs: int, data: DataSplit, device: str,
               rounds: int, batch_counts: list[int]) -> dict:
    """Median seconds of one training step, one measurement at each of ``batch_counts``
    and one histogram, timed in interleaved rounds of 50 steps / 1 measurement each / 1
    histogram at the same weights: robust to load spikes where whole-trial timings are not."""
    torch.manual_seed(0)
    model = build_model(model_name, (1, 40), 10, **MODELS[model_name]).to(device)
    opt = optimizer(family, model)
    steps = len(data) // bs
    probes = {n: VarianceProbe(ProbeSettings(every=1, batches=n), data, bs, 0, EPOCHS * steps)
              for n in batch_counts}
    ctx = Context(model, loss_fn, data, bs, 0, 0, epoch_generator(0, 0, -1))
    scheduled_work(opt.periodic(), ctx, 0)   # e.g. a snapshot a direction needs
    batches = [data.batch(idx) for idx in opt.sampler(len(data), bs, epoch_generator(0, 0))]
    step_t: list[float] = []
    hist_t: list[float] = []
    meas_t: dict[int, list[float]] = {n: [] for n in batch_counts}

    def timed(fn) -> float:
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        return time.perf_counter() - t0

    def fifty_steps():
        for i in range(50):
            opt.step(opt.direction(batches[i % len(batches)]))

    any_probe = probes[batch_counts[0]]
    for r in range(rounds + 1):
        s = timed(fifty_steps) / 50
        m = {n: timed(lambda p=p, r=r: p.measure(opt, r)) for n, p in probes.items()}
        h = timed(lambda r=r: any_probe.record_histogram(opt, r))
        if r:                                             # round 0 warms up
            step_t.append(s)
            hist_t.append(h)
            for n in batch_counts:
                meas_t[n].append(m[n])
    return {"step_s": statistics.median(step_t), "histogram_s": statistics.median(hist_t),
            "measure_s": {n: statistics.median(v) for n, v in meas_t.items()}}


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
    ap.add_argument("--batch-sizes", default=",".join(str(b) for b in DEFAULT_STUDY.batch_size))
    ap.add_argument("--points", type=int, help="measurements per trial (replaces the default)")
    ap.add_argument("--every", type=int, help="iterations between measurements (instead)")
    ap.add_argument("--batches", type=int, help="mini-batches per estimate")
    ap.add_argument("--spacing", choices=["linear", "log"])
    ap.add_argument("--unit-batches", default="1,2,3,5",
                    help="batches per estimate whose measurement cost is timed (projections)")
    ap.add_argument("--skip-trials", action="store_true", help="unit costs and projections only")
    ap.add_argument("--json", help="write the figures to this file")
    args = ap.parse_args()
    if args.points is not None and args.every is not None:
        ap.error("--points and --every: give one")
    torch.set_num_threads(args.threads)
    settings = schedule(args)
    setups = {"none": None,
              "measure": dataclasses.replace(settings, histograms=False),
              "measure+hist": dataclasses.replace(settings, histograms=True)}
    unit_batches = sorted({int(n) for n in args.unit_batches.split(",")} | {settings.batches})
    g = torch.Generator().manual_seed(0)
    data = DataSplit(torch.randn(TRAIN, 1, 40, generator=g),
                     torch.randint(0, 10, (TRAIN,), generator=g)).to(args.device)
    cells = [(m, f, int(b)) for m in MODELS for f in args.families.split(",")
             for b in args.batch_sizes.split(",")]
    when = (f"{settings.points} points ({settings.spacing})" if settings.points
            else f"every {settings.every} iterations")
    print(f"device={args.device} threads={args.threads} whole-trial reps={args.reps} "
          f"unit-cost rounds={args.rounds} load average={os.getloadavg()[0]:.2f}; schedule: "
          f"{when}, {settings.batches} batches, {settings.histogram_points} histograms; "
          f"{EPOCHS} epochs x {TRAIN}/B steps; trials per cell "
          f"{ {c: WEIGHTS[c] for c in cells} }")
    rows = []
    for c in cells:
        row = {"model": c[0], "family": c[1], "batch_size": c[2],
               "iterations": EPOCHS * (TRAIN // c[2]), "weight": WEIGHTS[c] or 1,
               "measurements": count_measurements(settings, EPOCHS * (TRAIN // c[2]))}
        if args.skip_trials:
            row["t_eval_s"] = eval_seconds(c[0], data, args.device)
        else:
            row |= whole_trials(c, data, args, setups)
        row |= unit_costs(c[0], c[1], c[2], data, args.device, args.rounds, unit_batches)
        rows.append(row)
    if not args.skip_trials:
        print_trials(rows)
    print_units(rows, settings, unit_batches)
    projections = project(rows, unit_batches, settings)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"device": args.device, "threads": args.threads, "reps": args.reps,
                       "rounds": args.rounds, "target_share": TARGET,
                       "load_average": os.getloadavg()[0],
                       "settings": dataclasses.asdict(settings), "rows": rows,
                       "projections": projections}, fh, indent=2)


def print_trials(rows: list[dict]) -> None:
    print("\n(1) whole default trials, interleaved (medians of the repeats). By difference: "
          "loop = (T_probe - T_none) / T_probe, trial = (T_probe - T_none) / (T_probe + "
          "T_eval); in-run = seconds inside probe_step / (T_probe + T_eval) in the same run "
          "(what a trial's measure_s / time records; robust to load drifting between runs)")
    print(f"{'model':5} {'family':13} {'B':>4} {'iters':>5} {'meas':>4} {'hists':>5} "
          f"{'none s':>7} {'eval s':>7} {'probe s':>8} {'loop':>6} {'trial':>6} {'in-run':>6} "
          f"{'+hist s':>8} {'loop':>6} {'trial':>6} {'in-run':>6}")
    for r in rows:
        print(f"{r['model']:5} {r['family']:13} {r['batch_size']:4d} {r['iterations']:5d} "
              f"{r['measured']:4d} {r['histograms']:5d} {r['t_none_s']:7.3f} "
              f"{r['t_eval_s']:7.3f} {r['t_probe_s']:8.3f} {r['share_probe']:6.1%} "
              f"{r['trial_share_probe']:6.1%} {r['inrun_share_probe']:6.1%} "
              f"{r['t_probe_hist_s']:8.3f} {r['share_probe_hist']:6.1%} "
              f"{r['trial_share_probe_hist']:6.1%} {r['inrun_share_probe_hist']:6.1%}")
    print("\n    weighted by the default study's trials per cell (sums of times): "
          "loop / trial / in-run share")
    groups = {f"B={b}": [r for r in rows if r["batch_size"] == b]
              for b in sorted({r["batch_size"] for r in rows})}
    groups |= {f"{r['model']}": [x for x in rows if x["model"] == r["model"]] for r in rows}
    groups["STUDY"] = rows
    for name, rs in groups.items():
        print(f"    {name:7} measure {study_share(rs, 't_probe_s'):6.1%} / "
              f"{study_share(rs, 't_probe_s', True):6.1%} / "
              f"{inrun_share(rs, 'probe_s', 't_probe_s'):6.1%}   measure+hist "
              f"{study_share(rs, 't_probe_hist_s'):6.1%} / "
              f"{study_share(rs, 't_probe_hist_s', True):6.1%} / "
              f"{inrun_share(rs, 'probe_hist_s', 't_probe_hist_s'):6.1%}")


def study_share(rows: list[dict], key: str, with_eval: bool = False) -> float:
    """Σ w (T_probe − T_none) / Σ w (T_probe [+ T_eval]) over ``rows`` (w = trials of the
    cell)."""
    extra = sum(r["weight"] * (r[key] - r["t_none_s"]) for r in rows)
    return extra / sum(r["weight"] * (r[key] + (r["t_eval_s"] if with_eval else 0))
                       for r in rows)


def inrun_share(rows: list[dict], inside: str, total: str) -> float:
    """Σ w (seconds inside the probe) / Σ w (T_probe + T_eval)."""
    return (sum(r["weight"] * r[inside] for r in rows)
            / sum(r["weight"] * (r[total] + r["t_eval_s"]) for r in rows))


def print_units(rows: list[dict], settings: ProbeSettings, unit_batches: list[int]) -> None:
    print("\n(2) unit costs (medians of interleaved rounds); meas@n = one measurement with n "
          "batches, in ms and in training steps")
    head = " ".join(f"{f'meas@{n} ms':>10} {'steps':>5}" for n in unit_batches)
    print(f"{'model':5} {'family':13} {'B':>4} {'step ms':>8} {head} {'hist ms':>8}")
    for r in rows:
        cols = " ".join(f"{r['measure_s'][n] * 1e3:10.2f} {r['measure_s'][n] / r['step_s']:5.1f}"
                        for n in unit_batches)
        print(f"{r['model']:5} {r['family']:13} {r['batch_size']:4d} {r['step_s'] * 1e3:8.3f} "
              f"{cols} {r['histogram_s'] * 1e3:8.2f}")


def projected_share(rows: list[dict], points: int | None, batches: int,
                    settings: ProbeSettings, histograms: bool, with_eval: bool) -> dict:
    """Study-wide and per-batch-size share of the training loop (``with_eval``: of the loop
    and the evaluation) from unit costs, for ``points`` measurements of ``batches`` batches
    per trial (None: as many as ``settings`` schedules) (+ the histograms)."""
    out, total, meas = {}, collections.Counter(), collections.Counter()
    for r in rows:
        n_meas = (count_measurements(settings, r["iterations"]) if points is None else
                  len(measurement_iterations(r["iterations"], points, settings.spacing,
                                             settings.start)))
        cost = n_meas * r["measure_s"][batches]
        if histograms:
            cost += settings.histogram_points * r["histogram_s"]
        base = r["iterations"] * r["step_s"] + (r["t_eval_s"] if with_eval else 0.0)
        for key in (r["batch_size"], "study"):
            total[key] += r["weight"] * (base + cost)
            meas[key] += r["weight"] * cost
    for key in total:
        out[str(key)] = meas[key] / total[key]
    return out


def project(rows: list[dict], unit_batches: list[int], settings: ProbeSettings) -> list[dict]:
    sizes = sorted({r["batch_size"] for r in rows})
    with_eval = all("t_eval_s" in r for r in rows)
    what = "loop + evaluation" if with_eval else "training loop"
    print(f"\n(3) projected share of the sweep's {what} for P points × n batches per trial "
          f"({settings.spacing} spacing), with {settings.histogram_points} histograms "
          f"(measurements only in brackets): study-wide, then per batch size; target "
          f"{TARGET:.0%}")
    print(f"{'P':>3} {'n':>2} {'study':>15} " + " ".join(f"{f'B={b}':>15}" for b in sizes))
    keys = ["study"] + [str(b) for b in sizes]
    bare = projected_share(rows, None, settings.batches, settings, False, with_eval)
    full = projected_share(rows, None, settings.batches, settings, True, with_eval)
    print(f"as run ({settings.batches} batches, "
          + "/".join(str(count_measurements(settings, EPOCHS * (TRAIN // b))) for b in sizes)
          + " measurements): " + " ".join(f"{full[k]:6.1%} ({bare[k]:5.1%})" for k in keys))
    out = [{"points": "as run", "batches": settings.batches, "share": bare,
            "share_with_histograms": full, "includes_evaluation": with_eval}]
    for points in PROJECT_POINTS:
        for n in unit_batches:
            bare = projected_share(rows, points, n, settings, False, with_eval)
            full = projected_share(rows, points, n, settings, True, with_eval)
            mark = " <= target" if full["study"] <= TARGET else ""
            cols = " ".join(f"{full[k]:6.1%} ({bare[k]:5.1%})" for k in keys)
            print(f"{points:3d} {n:2d} {cols}{mark}")
            out.append({"points": points, "batches": n, "share": bare,
                        "share_with_histograms": full, "includes_evaluation": with_eval})
    return out


def whole_trials(cell: tuple, data: DataSplit, args, setups: dict) -> dict:
    """Setups interleaved in a shuffled order per repeat, after one warm-up trial."""
    m, f, b = cell
    trial(m, f, b, setups["measure+hist"], data, args.device)
    times: dict[str, list[float]] = {s: [] for s in setups}
    inside: dict[str, list[float]] = {s: [] for s in setups}
    counts: dict[str, tuple[int, int]] = {}
    order = random.Random(b)
    for _ in range(args.reps):
        names = list(setups)
        order.shuffle(names)
        for s in names:
            secs, in_probe, n_meas, n_hist = trial(m, f, b, setups[s], data, args.device)
            times[s].append(secs)
            inside[s].append(in_probe)
            counts[s] = (n_meas, n_hist)
    share = {s: statistics.median((p - n) / p for p, n in zip(times[s], times["none"]))
             for s in ("measure", "measure+hist")}
    t_eval = eval_seconds(m, data, args.device)
    return {"t_eval_s": t_eval, "measured": counts["measure"][0],
            "histograms": counts["measure+hist"][1],
            "t_none_s": statistics.median(times["none"]),
            "t_probe_s": statistics.median(times["measure"]),
            "t_probe_hist_s": statistics.median(times["measure+hist"]),
            "probe_s": statistics.median(inside["measure"]),
            "probe_hist_s": statistics.median(inside["measure+hist"]),
            "inrun_share_probe": statistics.median(
                i / (p + t_eval) for i, p in zip(inside["measure"], times["measure"])),
            "inrun_share_probe_hist": statistics.median(
                i / (p + t_eval) for i, p in zip(inside["measure+hist"],
                                                 times["measure+hist"])),
            "share_probe": share["measure"], "share_probe_hist": share["measure+hist"],
            "trial_share_probe": statistics.median(
                (p - n) / (p + t_eval) for p, n in zip(times["measure"], times["none"])),
            "trial_share_probe_hist": statistics.median(
                (p - n) / (p + t_eval) for p, n in zip(times["measure+hist"], times["none"]))}


def eval_seconds(model_name: str, data: DataSplit, device: str, reps: int = 5) -> float:
    """What run_trial spends evaluating: the initial training loss, then train / validation
    / test after every epoch (median of ``reps`` timings of one epoch's evaluation)."""
    g = torch.Generator().manual_seed(1)
    val, test = (DataSplit(torch.randn(n, 1, 40, generator=g),
                           torch.randint(0, 10, (n,), generator=g)).to(device)
                 for n in (VAL, TEST))
    model = build_model(model_name, (1, 40), 10, **MODELS[model_name]).to(device)
    evaluate(model, data)                             # warm-up
    one, epoch = [], []
    for _ in range(reps):
        _sync(device)
        t0 = time.perf_counter()
        evaluate(model, data)
        _sync(device)
        t1 = time.perf_counter()
        evaluate(model, val)
        evaluate(model, test)
        _sync(device)
        one.append(t1 - t0)
        epoch.append(time.perf_counter() - t0)
    return statistics.median(one) + EPOCHS * statistics.median(epoch)


if __name__ == "__main__":
    main()
