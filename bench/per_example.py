"""Per-example gradient statistics and the families built on them, beside a plain step.

For each model at batch 128 every method's time per call is divided by a plain
forward+backward (``autograd.grad`` of the mean loss) measured in the same repeat; methods
are interleaved (order rotated per repeat; each sample repeats the call for ~50 ms) and the
figure is the median of the per-repeat ratios. Methods:
- sgd: plain SGD step (direction + update), snr: SNR-gradient I step, wt: well-tempered
  (epoch variant, snr in force) step;
- stats: ``study.grads.batch_stats`` (sum, elementwise second moment, per-example norms);
- vmap: torch.func ``vmap(grad(...))`` per-example gradients, then mean, var and norms;
- loop: one backward per example over ``--loop-examples`` examples, extrapolated to the batch.

The arithmetic floor of the statistics: multiply-adds of the plain forward+backward (every
Linear/Conv forward, weight gradient, and input gradient where the input needs one), plus
the extra products the statistics need (Linear 2-D: (G∘G)ᵀ(A∘A), one more weight-sized
matmul; materialized per-example gradients: squaring and reducing B×P entries twice),
divided by the plain count. Elementwise layers and data movement (unfold) are not counted.

    .venv/bin/python bench/per_example.py [--repeats 7] [--threads 2] [--device cpu] [--json FILE]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from study.data import Batch
from study.grads import batch_stats
from study.models import MLP, LeNet, ResNet8
from study.optim import make_optimizer

TARGETS = {"mlp": 1.45, "lenet": 1.6, "resnet8-group": 1.5, "resnet8-none": 1.5}


def ce(logits, y):
    return F.cross_entropy(logits, y, reduction="none")


def setups(batch: int):
    return {
        "mlp": (lambda: MLP(784, [1024, 1024], 10), (batch, 784)),
        "lenet": (lambda: LeNet((1, 28, 28), [20, 50], 500, 10), (batch, 1, 28, 28)),
        "resnet8-group": (lambda: ResNet8(3, [16, 32, 64], 10, "group"), (batch, 3, 32, 32)),
        "resnet8-none": (lambda: ResNet8(3, [16, 32, 64], 10, "none"), (batch, 3, 32, 32)),
    }


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
    model(x).sum().backward()
    for h in handles:
        h.remove()
    model.zero_grad(set_to_none=True)
    return plain, plain + extra


def methods(model, x, y, loop_examples: int):
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

    def stats():
        batch_stats(model, ce, batch)

    names = [n for n, p in model.named_parameters() if p.requires_grad]

    def one_loss(p, xi, yi):
        return ce(functional_call(model, dict(zip(names, p)), (xi[None],)), yi[None]).sum()

    per_example = vmap(grad(one_loss), in_dims=(None, 0, 0))

    def vmapped():
        gs = per_example(tuple(p.detach() for p in params), x, y)
        [g.mean(0) for g in gs], [g.var(0, unbiased=False) for g in gs]
        sum(g.reshape(len(y), -1).pow(2).sum(1) for g in gs)

    def loop():
        for i in range(loop_examples):
            torch.autograd.grad(ce(model(x[i:i + 1]), y[i:i + 1]).sum(), params)

    return {"plain": plain, "sgd": lambda: sgd.step(sgd.direction(batch)),
            "snr": lambda: snr.step(snr.direction(batch)),
            "wt": lambda: wt.step(wt.direction(batch)), "stats": stats, "vmap": vmapped,
            "loop": loop}


GROUPS = (("plain", "sgd", "snr", "wt", "stats"), ("plain", "vmap"), ("plain", "loop"))
"""Methods timed together; the memory-hungry baselines (vmap materializes B×P gradients)
get their own groups so they do not disturb the cache and allocator state of the others."""


def measure(fns: dict, repeats: int, sync, sample_s: float = 0.05) -> dict[str, float]:
    """Median over repeats of (method time / plain time in the same repeat), per group.
    Each sample repeats a call enough times to last about ``sample_s``."""
    ratios: dict[str, float] = {}
    for group in GROUPS:
        calls = {}
        for n in group:
            fns[n]()
            sync()
            t0 = time.perf_counter()
            fns[n]()
            sync()
            calls[n] = max(1, int(sample_s / max(time.perf_counter() - t0, 1e-6)))
        times: dict[str, list[float]] = {n: [] for n in group}
        for r in range(repeats):
            order = group[r % len(group):] + group[:r % len(group)]
            for n in order:
                sync()
                t0 = time.perf_counter()
                for _ in range(calls[n]):
                    fns[n]()
                sync()
                times[n].append((time.perf_counter() - t0) / calls[n])
        for n in group[1:]:
            ratios[n] = statistics.median(t / p for t, p in zip(times[n], times["plain"]))
        if group is GROUPS[0]:
            ratios["plain_ms"] = statistics.median(times["plain"]) * 1e3
    return ratios


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--loop-examples", type=int, default=16)
    ap.add_argument("--models", nargs="+", default=list(TARGETS), choices=list(TARGETS))
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    scale_loop = args.batch / args.loop_examples
    print(f"per-example statistics, batch {args.batch}, {args.device}, {args.threads} threads, "
          f"median of {args.repeats} interleaved repeats; ratio to plain forward+backward; "
          f"loop = {args.loop_examples} examples extrapolated x{scale_loop:g}")
    header = (f"{'model':14s} {'plain ms':>8s} {'sgd':>6s} {'snr':>6s} {'wt':>6s} "
              f"{'stats':>6s} {'floor':>6s} {'target':>6s} {'met':>4s} {'vmap':>7s} "
              f"{'loop':>7s}")
    print(header)
    results = {}
    for name in args.models:
        make, shape = setups(args.batch)[name]
        model = make().to(device)
        x = torch.randn(*shape, device=device)
        y = torch.randint(0, 10, (args.batch,), device=device)
        plain_macs, stats_macs = flop_floor(model, x)
        r = measure(methods(model, x, y, args.loop_examples), args.repeats, sync)
        r["loop"] *= scale_loop
        r["floor"] = stats_macs / plain_macs
        r["target"] = TARGETS[name]
        r["met"] = r["stats"] <= TARGETS[name]
        results[name] = r
        print(f"{name:14s} {r['plain_ms']:8.1f} {r['sgd']:6.2f} {r['snr']:6.2f} {r['wt']:6.2f} "
              f"{r['stats']:6.2f} {r['floor']:6.2f} {r['target']:6.2f} "
              f"{'yes' if r['met'] else 'NO':>4s} {r['vmap']:7.2f} {r['loop']:7.2f}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
