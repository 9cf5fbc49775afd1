"""Cost of every registered optimizer family relative to SGD with momentum, side by side.

For each model/batch-size setup and each (family, variant) in ``study.optim.FAMILIES``:
- *per step*: the median time of ``direction`` + ``step`` (the scheduled work excluded),
  divided by SGD's measured in the same repeat (methods interleaved, order rotated per
  repeat; the figure is the median of the per-repeat ratios);
- *+frequent*: per step plus each ``frequent`` work's time spread over its period;
- *amortized*: per step plus all scheduled work spread over its period (``iter`` work over
  ``every`` iterations, ``epoch`` work over ``every·⌊N/B⌋`` iterations; work that runs only
  once at the start, period ≥ 2^40, counts 0). Work is timed in the first
  ``--work-repeats`` repeats and enters as its median.
Epoch work costs about a pass over the N examples and recurs every ⌊N/B⌋ iterations, so its
amortized share does not depend on N; the MNIST-shaped setup uses N=6,000 to keep the
bench short. Data are random tensors of the right shapes (timing does not depend on values).

Targets printed: GC online (+frequent) ≤ 1.5×; K-FAC amortized ≤ 1.5× on the default
study's models (t_cov=10, t_inv=100); on the 784-1024-1024-10 MLP K-FAC's per-step ratio
beside the arithmetic floor, within 1.2× of it.

    .venv/bin/python bench/families.py [--repeats 5] [--threads 2] [--json FILE] [--strict]

Failed targets print FAIL (and exit 1 only with ``--strict``, so ``make bench`` runs on).
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

import study.optim
from study.data import DataSplit
from study.models import MLP, CNN1d
from study.optim import Context
from study.optim.kfac import kfac_layers

ONCE = 2 ** 40
"""Periods at least this long mean "only at the start" (e.g. SVRG's bootstrap)."""


@dataclass
class Setup:
    name: str
    model: callable
    shape: tuple[int, ...]
    batch_size: int
    n_train: int


SETUPS = [
    Setup("mlp40 B=32", lambda: MLP(40, [100, 100], 10), (1, 40), 32, 3600),
    Setup("mlp40 B=128", lambda: MLP(40, [100, 100], 10), (1, 40), 128, 3600),
    Setup("cnn1d B=32", lambda: CNN1d(1, 40, [25, 25, 25], 10), (1, 40), 32, 3600),
    Setup("cnn1d B=128", lambda: CNN1d(1, 40, [25, 25, 25], 10), (1, 40), 128, 3600),
    Setup("mlp784-1024 B=128", lambda: MLP(784, [1024, 1024], 10), (1, 28, 28), 128, 6000),
]
DEFAULT_STUDY = {"mlp40 B=32", "mlp40 B=128", "cnn1d B=32", "cnn1d B=128"}


def loss_fn(logits, y):
    return F.cross_entropy(logits, y, reduction="none")


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@dataclass
class Method:
    label: str
    opt: object
    ctx: Context
    batches: list
    work: list                   # (Periodic, period in iterations)
    step_times: list = field(default_factory=list)
    work_times: dict = field(default_factory=dict)
    error: str | None = None


def build(label, cls, variant, setup: Setup, base_model, data, device) -> Method:
    model = copy.deepcopy(base_model)
    opt = cls(model, loss_fn, 1e-3, variant)
    gen = torch.Generator().manual_seed(0)
    ctx = Context(model, loss_fn, data, setup.batch_size, 0, 0, gen)
    epoch_iters = len(data) // setup.batch_size
    work = [(p, p.every * (epoch_iters if p.unit == "epoch" else 1)) for p in opt.periodic()]
    for p, _ in work:        # the state a trial has after its first scheduled work
        p.run(ctx)
    batches = [data.batch(idx) for idx in opt.sampler(len(data), setup.batch_size, gen)]
    return Method(label, opt, ctx, batches, work)


def time_steps(m: Method, steps: int, device: str) -> float:
    sync(device)
    start = time.perf_counter()
    for i in range(steps):
        m.opt.step(m.opt.direction(m.batches[i % len(m.batches)]))
    sync(device)
    return (time.perf_counter() - start) / steps


def time_work(m: Method, device: str) -> None:
    for i, (p, period) in enumerate(m.work):
        if period >= ONCE:
            continue
        sync(device)
        start = time.perf_counter()
        p.run(m.ctx)
        sync(device)
        m.work_times.setdefault(i, []).append(time.perf_counter() - start)


def run_setup(setup: Setup, args) -> list[dict]:
    torch.manual_seed(0)
    device = args.device
    base_model = setup.model().to(device)
    data = DataSplit(torch.randn(setup.n_train, *setup.shape, device=device),
                     torch.randint(0, 10, (setup.n_train,), device=device))
    methods = []
    for family, cls in study.optim.FAMILIES.items():
        for variant in cls.variants:
            label = f"{family}/{variant}"
            if args.families and family not in args.families and label != "sgd/momentum":
                continue
            try:
                methods.append(build(label, cls, variant, setup, base_model, data, device))
            except Exception as err:  # noqa: BLE001 - a family in progress must not stop the bench
                methods.append(Method(label, None, None, [], [], error=repr(err)[:80]))
    live = [m for m in methods if m.error is None]
    sgd = next(m for m in live if m.label == "sgd/momentum")
    steps = args.steps or calibrate(sgd, device)
    for m in live:                                    # warm-up
        time_steps(m, max(2, steps // 10), device)
    for r in range(args.repeats):
        order = live[r % len(live):] + live[:r % len(live)]
        for m in order:
            try:
                m.step_times.append(time_steps(m, steps, device))
                if r < args.work_repeats:
                    time_work(m, device)
            except Exception as err:  # noqa: BLE001 - report it in the table instead
                m.error = repr(err)[:80]
        live = [m for m in live if m.error is None]
    rows = []
    for m in methods:
        row = {"setup": setup.name, "method": m.label, "error": m.error}
        if m.error is None:
            row.update(ratios(m, sgd))
        rows.append(row)
    return rows


def calibrate(sgd: Method, device: str, budget: float = 0.15) -> int:
    per_step = min(time_steps(sgd, 5, device) for _ in range(3))
    return int(min(400, max(10, budget / per_step)))


def ratios(m: Method, sgd: Method) -> dict:
    """Medians over repeats of per-repeat ratios to SGD (same repeat, same conditions)."""
    freq = [i for i, (p, period) in enumerate(m.work) if p.size == "minibatch" and period < ONCE]
    every = [i for i, (_, period) in enumerate(m.work) if period < ONCE]

    work = {i: statistics.median(m.work_times[i]) for i in every}

    def amortized(r: int, which: list[int]) -> float:
        extra = sum(work[i] / m.work[i][1] for i in which)
        return (m.step_times[r] + extra) / sgd.step_times[r]

    reps = range(len(m.step_times))
    return {"step_ms": statistics.median(m.step_times) * 1e3,
            "per_step": statistics.median(m.step_times[r] / sgd.step_times[r] for r in reps),
            "plus_frequent": statistics.median(amortized(r, freq) for r in reps),
            "amortized": statistics.median(amortized(r, every) for r in reps),
            "work": {f"{m.work[i][0].size}/{m.work[i][0].run.__name__} every "
                     f"{m.work[i][1]} it": work[i] * 1e3 for i in every}}


def kfac_floor(model: torch.nn.Module, shape: tuple[int, ...], batch_size: int
               ) -> tuple[float, float]:
    """(brief's floor, 4-matmul floor) = 1 + k·extra/step over the K-FAC layers, k = 1, 2.

    Step multiply-adds: 3·B·T·d_in·d_out per layer (forward, input and weight gradients; T
    output positions, 1 for Linear). Preconditioning one [W|b] (d_out × d_in, d_in counting
    the bias column) by the eigenbasis formula is Q_gᵀ·M·Q_a and then Q_g·(·)·Q_aᵀ, each
    pair d_out²·d_in + d_out·d_in²; the brief's floor counts one pair (k = 1), the formula
    needs both (k = 2).
    """
    layers = kfac_layers(model)
    outputs = {}
    hooks = [m.register_forward_hook(lambda mod, i, o: outputs.__setitem__(mod, o))
             for m in layers]
    with torch.no_grad():
        model(torch.zeros(1, *shape))
    for h in hooks:
        h.remove()
    step = extra = 0
    for m in layers:
        positions = outputs[m][0, 0].numel() if outputs[m].dim() > 2 else 1
        d_out = m.weight.shape[0]
        d_in = m.weight[0].numel() + (m.bias is not None)
        step += 3 * batch_size * positions * d_in * d_out
        extra += d_out ** 2 * d_in + d_out * d_in ** 2
    return 1 + extra / step, 1 + 2 * extra / step


def print_table(rows: list[dict]) -> None:
    head = f"{'setup':<19}{'method':<26}{'ms/step':>9}{'step×':>8}{'+freq×':>8}{'amort×':>8}"
    print(head)
    print("-" * len(head))
    for r in rows:
        if r["error"]:
            print(f"{r['setup']:<19}{r['method']:<26}  error: {r['error']}")
            continue
        print(f"{r['setup']:<19}{r['method']:<26}{r['step_ms']:>9.3f}{r['per_step']:>8.2f}"
              f"{r['plus_frequent']:>8.2f}{r['amortized']:>8.2f}")


def targets(rows: list[dict], floors: dict) -> list[dict]:
    checks = []
    for r in rows:
        if r["error"]:
            continue
        if r["method"] == "gc/online":
            checks.append({"check": f"GC online step (+frequent) {r['setup']}",
                           "value": r["plus_frequent"], "limit": 1.5})
        if r["method"].startswith("kfac/") and r["setup"] in DEFAULT_STUDY:
            checks.append({"check": f"K-FAC amortized {r['setup']}", "value": r["amortized"],
                           "limit": 1.5})
        if r["method"].startswith("kfac/") and r["setup"] not in DEFAULT_STUDY:
            brief, exact = floors[r["setup"]]
            for name, floor in (("brief floor", brief), ("4-matmul floor", exact)):
                checks.append({"check": f"K-FAC step / {name} {floor:.2f} {r['setup']}",
                               "value": r["per_step"] / floor, "limit": 1.2})
    return checks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work-repeats", type=int, default=2,
                    help="repeats that also time the scheduled work (snapshots are slow)")
    ap.add_argument("--steps", type=int, default=0, help="steps per timing (0: calibrate)")
    ap.add_argument("--strict", action="store_true", help="exit 1 when a target fails")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--setups", nargs="*", default=None, help="subset of setup names")
    ap.add_argument("--families", nargs="*", default=None, help="subset (sgd always runs)")
    ap.add_argument("--json", default=None, help="write the figures to this file")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows, floors = [], {}
    for setup in SETUPS:
        if args.setups and setup.name not in args.setups:
            continue
        floors[setup.name] = kfac_floor(setup.model(), setup.shape, setup.batch_size)
        rows += run_setup(setup, args)
    print(f"threads={args.threads} repeats={args.repeats} device={args.device}; ratios are "
          "to sgd/momentum, medians of per-repeat ratios")
    print_table(rows)
    print()
    for name, (brief, exact) in floors.items():
        kfac = [r for r in rows if r["setup"] == name and r["method"].startswith("kfac/")
                and not r["error"]]
        measured = f"{kfac[0]['per_step']:.2f}" if kfac else "n/a"
        print(f"K-FAC arithmetic floor {name:<19} brief {brief:5.2f}  4-matmul {exact:5.2f}  "
              f"measured per step {measured}")
    print()
    checks = targets(rows, floors)
    for c in checks:
        c["ok"] = c["value"] <= c["limit"]
        print(f"{'PASS' if c['ok'] else 'FAIL'}  {c['check']}: {c['value']:.2f} "
              f"(limit {c['limit']})")
    print()
    for r in rows:
        if r.get("work"):
            work = ", ".join(f"{k}: {v:.1f} ms" for k, v in r["work"].items())
            print(f"{r['setup']:<19}{r['method']:<26}{work}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"threads": args.threads, "repeats": args.repeats, "rows": rows,
                       "floors": floors, "checks": checks}, f, indent=1)
    if args.strict and not all(c["ok"] for c in checks):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
