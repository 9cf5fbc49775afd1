"""Cost of GC's full clustering passes relative to a plain full-gradient pass, side by side.

A GC pass runs one forward + backward per example (hooks record inputs and output
gradients) plus the factorized distances to C rank-1 centers; the baseline is SVRG's
snapshot, ``full_gradient`` over the same N examples in its own chunks. Methods are interleaved,
order rotated per repeat; each figure is the median over repeats of the per-repeat ratio.
Target printed (the project standard: per-example statistics cost about one extra
backward): an assignment pass with C = 10 within 2x of the gradient pass.

    .venv/bin/python bench/gc_passes.py [--repeats 5] [--threads 1] [--json FILE]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from study.data import DataSplit
from study.models import MLP, CNN1d, LeNet
from study.optim import Context, make_optimizer
from study.optim.svrg import FULL_PASS_BATCH, full_gradient

SETUPS = {
    "mlp40 N=3600": (lambda: MLP(40, [100, 100], 10), (1, 40), 3600),
    "cnn1d N=3600": (lambda: CNN1d(1, 40, [25, 25, 25], 10), (1, 40), 3600),
    "mlp784-1024 N=4000": (lambda: MLP(784, [1024, 1024], 10), (1, 28, 28), 4000),
    "lenet N=2000": (lambda: LeNet((1, 28, 28), [20, 50], 500, 10), (1, 28, 28), 2000),
}


def loss_fn(logits, y):
    return F.cross_entropy(logits, y, reduction="none")


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run(name: str, repeats: int) -> list[dict]:
    build, shape, n = SETUPS[name]
    torch.manual_seed(0)
    model = build()
    data = DataSplit(torch.randn(n, *shape), torch.randint(0, 10, (n,)))
    params = [p for p in model.parameters() if p.requires_grad]
    methods = {"gradient pass": lambda: full_gradient(model, loss_fn, data, params,
                                                      FULL_PASS_BATCH)}
    for c in (10, 128):
        opt = make_optimizer("gc", model, loss_fn, 0.1, "batch", nclusters=c)
        ctx = Context(model, loss_fn, data, 128, 0, 0, torch.Generator().manual_seed(0))
        opt.init_centers(ctx)
        methods[f"gc assign C={c}"] = lambda o=opt, x=ctx: o._pass(x, accumulate=False)
        methods[f"gc assign+centers C={c}"] = lambda o=opt, x=ctx: o._pass(x, accumulate=True)
    for fn in methods.values():                       # warm-up
        fn()
    times = {k: [] for k in methods}
    labels = list(methods)
    for r in range(repeats):
        for k in labels[r % len(labels):] + labels[:r % len(labels)]:
            times[k].append(timed(methods[k]))
    base = times["gradient pass"]
    return [{"setup": name, "method": k, "seconds": statistics.median(v),
             "ratio": statistics.median(t / b for t, b in zip(v, base))}
            for k, v in times.items()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--setups", nargs="*", default=list(SETUPS))
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = [row for name in args.setups for row in run(name, args.repeats)]
    print(f"{'setup':20s} {'method':26s} {'seconds':>8s} {'x gradient pass':>15s}")
    for r in rows:
        print(f"{r['setup']:20s} {r['method']:26s} {r['seconds']:8.3f} {r['ratio']:15.2f}")
    checks = [{"check": f"GC assignment pass C=10 {r['setup']}", "value": r["ratio"],
               "limit": 2.0, "ok": r["ratio"] <= 2.0}
              for r in rows if r["method"] == "gc assign C=10"]
    for c in checks:
        print(f"{'PASS' if c['ok'] else 'FAIL'}  {c['check']}: {c['value']:.2f} "
              f"(limit {c['limit']})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "checks": checks, "threads": args.threads,
                       "repeats": args.repeats}, f, indent=1)


if __name__ == "__main__":
    main()
