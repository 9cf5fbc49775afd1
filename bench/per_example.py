"""Per-example gradient statistics and the families built on them, beside a plain step and
the peers (torch.func, BackPACK, Opacus).

For each model at batch 128 every method's time per call is divided by a plain
forward+backward (``autograd.grad`` of the mean loss) measured in the same repeat; methods
are interleaved (order rotated per repeat; each sample repeats the call for ~50 ms) and the
figure is the median of the per-repeat ratios. Methods:
- sgd: plain SGD step (direction + update), snr: SNR-gradient I step, wt: well-tempered
  (epoch variant, snr in force) step;
- stats: ``study.grads.batch_stats`` (sum, elementwise second moment, per-example norms);
  sum: the same engine asked for the sum only (its own overhead: hooks, the backward to the
  layer outputs, the weight-gradient products), +norms: sum and norms, no second moment;
  fallback: ``stats`` with every module but nn.Linear forced through the generic torch.func
  fallback (``study/grads/fallback.py``), as the issue measured it;
- torch.func: ``vmap(grad(...))`` over the whole model, then the three reductions;
- backpack: BackPACK ``SumGradSquared`` + ``BatchL2Grad`` beside the gradient (its
  cheapest route to the same three quantities); opacus: Opacus ``GradSampleModule``
  (per-example gradients, then the reductions); each on its own copy of the model;
- loop: one backward per example over ``--loop-examples`` examples, extrapolated to the batch.
Models: the study's (MLP, LeNet, ResNet-8) and, outside its test suite, an Embedding +
LayerNorm text model, a reflect-padded conv net, an ``nn.Bilinear`` model and the MNIST-1D
CNN (``tests/peers.py``).

Correctness (``err`` columns): the largest absolute difference of a method's sum, second
moment and squared norms from a float64 per-example loop, relative to the largest entry of
that quantity, on ``--check-batch`` examples of a float64 copy; WRONG above 1e-8, n/a where
the peer has no rule for a layer (or fails on it).

The arithmetic floor of the statistics: multiply-adds of the plain forward+backward (every
Linear/Conv forward, weight gradient, and input gradient where the input needs one), plus
the extra products the statistics need (Linear 2-D: (G∘G)ᵀ(A∘A), one more weight-sized
matmul; materialized per-example gradients: squaring and reducing B×P entries twice),
divided by the plain count. Elementwise layers and data movement (unfold) are not counted.

Where the MLP's time goes (784-1024-1024-10, batch 128): the floor is 1.39×, all of it
matrix products (the second moment's (G∘G)ᵀ(A∘A) is a third weight-sized product per layer
beside the forward and the weight gradient). ``sum`` (the engine without the statistics'
products) measures the engine's own overhead above plain: hooks, the backward to the
outputs, the handlers' Python; ``+norms`` adds the squares g∘g, a∘a and their row sums
(elementwise, B×width); ``stats`` minus ``+norms`` is the second-moment product.

    .venv/bin/python bench/per_example.py [--repeats 7] [--threads 2] [--models ...]
        [--peers torch.func backpack opacus] [--json FILE]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn

sys.path[:0] = [str(Path(__file__).resolve().parents[1]),
                str(Path(__file__).resolve().parents[1] / "tests")]

from peers import PEERS, Unsupported, ce, extra_models, run_peer  # noqa: E402
from reference import per_example_grads  # noqa: E402

from study.data import Batch  # noqa: E402
from study.grads import batch_stats  # noqa: E402
from study.grads import stats as engine  # noqa: E402
from study.grads.layer_types import FALLBACK  # noqa: E402
from study.models import MLP, LeNet, ResNet8  # noqa: E402
from study.optim import make_optimizer  # noqa: E402

TARGETS = {"mlp": 1.45, "lenet": 1.6, "resnet8-group": 1.5, "resnet8-none": 1.5}
WRONG = 1e-8


def setups(batch: int):
    """name -> (make model, make (x, y)): the study's models, then the peers' extra ones."""
    def images(*shape):
        return lambda: (torch.randn(batch, *shape), torch.randint(0, 10, (batch,)))

    own = {
        "mlp": (lambda: MLP(784, [1024, 1024], 10), images(784)),
        "lenet": (lambda: LeNet((1, 28, 28), [20, 50], 500, 10), images(1, 28, 28)),
        "resnet8-group": (lambda: ResNet8(3, [16, 32, 64], 10, "group"), images(3, 32, 32)),
        "resnet8-none": (lambda: ResNet8(3, [16, 32, 64], 10, "none"), images(3, 32, 32)),
    }
    return {**own, **extra_models(batch)}


def flop_floor(model: nn.Module, x: torch.Tensor) -> tuple[float, float]:
    """(plain multiply-adds, statistics multiply-adds) for one batch; see the docstring."""
    plain, extra = 0.0, 0.0
    batch = x.shape[0]

    def hook(m, inputs, out):
        nonlocal plain, extra
        a = inputs[0]
        if isinstance(m, nn.Linear):
            positions = a.numel() // (batch * a.shape[-1])
            macs = batch * positions * m.in_features * m.out_features
            extra_m = m.weight.numel() * batch if positions == 1 else 2 * batch * m.weight.numel()
        elif isinstance(m, (nn.Conv1d, nn.Conv2d)):
            macs = out.numel() * m.weight[0].numel()
            extra_m = 2 * batch * m.weight.numel()
        else:
            return
        plain += macs * (3 if a.requires_grad else 2)
        extra += extra_m

    handles = [m.register_forward_hook(hook) for m in model.modules()]
    model(x).float().sum().backward()
    for h in handles:
        h.remove()
    model.zero_grad(set_to_none=True)
    return plain, plain + extra


@contextlib.contextmanager
def generic_fallback():
    """Every parameterized module but nn.Linear through the generic torch.func fallback
    (as the issue measured the fallback before LayerNorm, Embedding, Bilinear and padded
    convolutions had their own handlers)."""
    real = engine.stats_kind
    engine.stats_kind = lambda m: real(m) if isinstance(m, nn.Linear) else FALLBACK
    try:
        yield
    finally:
        engine.stats_kind = real


def methods(model, x, y, loop_examples: int, peers: list[str]):
    params = [p for p in model.parameters() if p.requires_grad]
    batch = Batch(x, y, torch.arange(len(y), device=x.device))
    sgd = make_optimizer("sgd", model, ce, lr=1e-9, variant="plain")
    snr = make_optimizer("snr", model, ce, lr=1e-9, variant="I")
    wt = make_optimizer("well_tempered", model, ce, lr=1e-9, variant="epoch")
    for _ in range(2):                      # an "epoch", so that the snr is in force
        wt.step(wt.direction(batch))
    wt.periodic()[0].run(None)

    def plain():
        torch.autograd.grad(ce(model(x), y).mean(), params)

    def fallback():
        with generic_fallback():
            batch_stats(model, ce, batch)

    def loop():
        for i in range(loop_examples):
            torch.autograd.grad(ce(model(x[i:i + 1]), y[i:i + 1]).sum(), params)

    fns = {"plain": plain, "sgd": lambda: sgd.step(sgd.direction(batch)),
           "snr": lambda: snr.step(snr.direction(batch)),
           "wt": lambda: wt.step(wt.direction(batch)),
           "stats": lambda: batch_stats(model, ce, batch),
           "sum": lambda: batch_stats(model, ce, batch, norms=False, second_moment=False),
           "+norms": lambda: batch_stats(model, ce, batch, second_moment=False),
           "fallback": fallback, "loop": loop}
    for peer in peers:                      # BackPACK and Opacus hook a copy of the model
        try:
            run = PEERS[peer](model)
            run(x, y)
            fns[peer] = lambda run=run: run(x, y)
        except Exception as e:              # noqa: BLE001 - any failure means "no result"
            print(f"  {peer}: n/a ({type(e).__name__}: {str(e)[:100]})", file=sys.stderr)
    return fns


GROUPS = (("plain", "sgd", "snr", "wt", "stats", "sum", "+norms"), ("plain", "fallback"),
          ("plain", "torch.func"),
          ("plain", "backpack"), ("plain", "opacus"), ("plain", "loop"))
"""Methods timed together; the memory-hungry baselines (torch.func and Opacus materialize
B×P gradients) get their own groups so they do not disturb the cache and allocator state of
the others."""


def measure(fns: dict, repeats: int, sync, sample_s: float = 0.05,
            clock=time.perf_counter) -> dict[str, float]:
    """Median over repeats of (method time / plain time in the same repeat), per group.
    Each sample repeats a call enough times to last about ``sample_s``. ``clock``:
    ``time.process_time`` counts this process's CPU time only (steadier on a shared
    machine; CPU only, and it sums over threads)."""
    ratios: dict[str, float] = {}
    for group in GROUPS:
        group = tuple(n for n in group if n in fns)
        if len(group) < 2:
            continue
        calls = {}
        for n in group:
            fns[n]()
            sync()
            t0 = clock()
            fns[n]()
            sync()
            calls[n] = max(1, int(sample_s / max(clock() - t0, 1e-6)))
        times: dict[str, list[float]] = {n: [] for n in group}
        for r in range(repeats):
            order = group[r % len(group):] + group[:r % len(group)]
            for n in order:
                sync()
                t0 = clock()
                for _ in range(calls[n]):
                    fns[n]()
                sync()
                times[n].append((clock() - t0) / calls[n])
        for n in group[1:]:
            ratios[n] = statistics.median(t / p for t, p in zip(times[n], times["plain"]))
        if group[1] == "sgd":
            ratios["plain_ms"] = statistics.median(times["plain"]) * 1e3
    return ratios


def errors(make, data, peers: list[str], batch: int) -> dict[str, float | None]:
    """Per method, the largest difference from a float64 per-example loop relative to the
    largest entry (sum, second moment, norms); None where the peer gives no result."""
    torch.manual_seed(1)
    model = make().double()
    x, y = (t[:batch] for t in data())
    x = x.double() if x.is_floating_point() else x
    per = per_example_grads(model, x, y, loss=ce)
    ref = ([g.sum(0) for g in per], [(g * g).sum(0) for g in per],
           sum((g.reshape(len(y), -1) ** 2).sum(1) for g in per))

    def error(got) -> float:
        worst = 0.0
        for mine, truth in zip(got, ref):
            mine, truth = (mine, truth) if isinstance(truth, list) else ([mine], [truth])
            scale = max(float(t.abs().max()) for t in truth) or 1.0
            worst = max(worst, max(float((m - t).abs().max()) for m, t in zip(mine, truth))
                        / scale)
        return worst

    s = batch_stats(model, ce, (x, y))
    out: dict[str, float | None] = {"stats": error((s.sum, s.sum_sq, s.norms_sq))}
    for peer in peers:
        try:
            out[peer] = error(run_peer(peer, model, x, y))
        except Unsupported:
            out[peer] = None
    return out


def cell(r: dict, c: str) -> str:
    v = r.get(c)
    return f"{'n/a' if v is None else f'{v:.2f}':>7s}"


def show_err(e: float | None) -> str:
    return "n/a" if e is None else f"{'WRONG ' if e > WRONG else ''}{e:.0e}"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--check-batch", type=int, default=8)
    ap.add_argument("--loop-examples", type=int, default=16)
    names = list(setups(1))
    ap.add_argument("--models", nargs="+", default=names, choices=names)
    ap.add_argument("--peers", nargs="*", default=list(PEERS), choices=list(PEERS))
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="cpu: this process's CPU time (steadier beside other jobs)")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")       # the peers' deprecation and fallback notes
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    scale_loop = args.batch / args.loop_examples
    print(f"per-example statistics, batch {args.batch}, {args.device}, {args.threads} threads, "
          f"{args.clock} clock, median of {args.repeats} interleaved repeats; ratio to plain "
          f"forward+backward; "
          f"loop = {args.loop_examples} examples extrapolated x{scale_loop:g}; err vs a "
          f"float64 loop on {args.check_batch} examples (relative to the largest entry)")
    cols = ["sgd", "snr", "wt", "sum", "+norms", "stats", "floor", "target", "fallback",
            "torch.func", "backpack", "opacus", "loop"]
    print(f"{'model':14s} {'plain ms':>8s} " + " ".join(f"{c:>7s}" for c in cols)
          + "   err: " + " ".join(f"{c:>10s}" for c in ["stats", *args.peers]))
    results = {}
    for name in args.models:
        make, data = setups(args.batch)[name]
        torch.manual_seed(0)
        model = make().to(device)
        x, y = (t.to(device) for t in data())
        plain_macs, stats_macs = flop_floor(model, x)
        r = measure(methods(model, x, y, args.loop_examples, args.peers), args.repeats, sync,
                    clock=time.process_time if args.clock == "cpu" else time.perf_counter)
        r["loop"] *= scale_loop
        r["floor"] = stats_macs / plain_macs if plain_macs else None
        r["target"] = TARGETS.get(name)
        r["met"] = None if r["target"] is None else r["stats"] <= r["target"]
        r["err"] = errors(make, data, args.peers, args.check_batch)
        results[name] = r
        met = "" if r["met"] is None else (" met" if r["met"] else " MISSED")
        print(f"{name:14s} {r['plain_ms']:8.1f} " + " ".join(cell(r, c) for c in cols)
              + "   err: " + " ".join(f"{show_err(r['err'].get(c)):>10s}"
                                      for c in ["stats", *args.peers]) + met, flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
