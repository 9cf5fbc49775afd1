"""The input pipeline's share of a training step, on the device a trial trains on.

A trial keeps its whole training split on the device and never uses a DataLoader: per step
it draws the next indices of a CPU permutation (``UniformSampler``, seeded per epoch so
resume is exact), moves those indices to the device and gathers the batch there
(``DataSplit.batch``: ``index_select``). This bench times, per step and side by side,

- **pipeline**: next indices + ``idx.to(device)`` + the gather;
- **step**: the family's ``direction`` (forward, backward) + ``step`` on that batch,

for the default study's models (MNIST-1D MLP 40-100-100-10 and CNN) at batch 32 and 128
with SGD + momentum: an epoch as a trial runs it against the same steps on batches gathered
beforehand, interleaved, the device synchronised around each. The pipeline's cost is the
difference of the medians (so a stall it causes counts), reported as a share of the epoch
(target ≤ 5%, issue 13 item 6c; it matters on a GPU, where a step is short and a host round
trip is not). On a loaded CPU the difference is noisy: raise ``--repeats``. Data are random
tensors of the right shapes.

    .venv/bin/python bench/input_pipeline.py [--device cuda] [--repeats 15] [--json FILE]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from study.data import DataSplit, UniformSampler, epoch_generator
from study.models import MLP, CNN1d
from study.optim import make_optimizer
from study.trial import loss_fn

TARGET = 0.05
MODELS = {"mlp": lambda: MLP(40, [100, 100], 10), "cnn": lambda: CNN1d(1, 40, [25, 25, 25], 10)}
N_TRAIN = 3600   # the default study's MNIST-1D training split


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(model_name: str, batch_size: int, device: torch.device, repeats: int) -> dict:
    """Per-step seconds of an epoch as a trial runs it (pipeline + step) and of the same
    steps on batches gathered beforehand (step only), interleaved ``repeats`` times; the
    pipeline's cost is the difference of the medians, so whatever it stalls is counted."""
    torch.manual_seed(0)
    model = MODELS[model_name]().to(device)
    data = DataSplit(torch.randn(N_TRAIN, 1, 40, device=device),
                     torch.randint(0, 10, (N_TRAIN,), device=device))
    opt = make_optimizer("sgd", model, loss_fn, 0.01, "momentum")
    n_steps = N_TRAIN // batch_size

    def as_trained(epoch: int) -> None:
        for idx in UniformSampler(len(data), batch_size, epoch_generator(0, epoch)):
            opt.step(opt.direction(data.batch(idx)))

    def gathered(batches: list) -> None:
        for batch in batches:
            opt.step(opt.direction(batch))

    def timed(fn, *args) -> float:
        sync(device)
        t0 = time.perf_counter()
        fn(*args)
        sync(device)
        return (time.perf_counter() - t0) / n_steps

    full, steps = [], []
    for epoch in range(repeats + 1):
        batches = [data.batch(idx) for idx in
                   UniformSampler(len(data), batch_size, epoch_generator(0, epoch))]
        pair = [timed(as_trained, epoch), timed(gathered, batches)]
        if epoch:                 # the first epoch pays for allocation and kernel selection
            full.append(pair[0])
            steps.append(pair[1])
    f, s = statistics.median(full), statistics.median(steps)
    return {"model": model_name, "batch_size": batch_size, "pipeline_us": (f - s) * 1e6,
            "step_us": s * 1e6, "share": max(f - s, 0.0) / f}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeats", type=int, default=15, help="epochs per arm")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rows = [measure(m, bs, device, args.repeats) for m in MODELS for bs in (32, 128)]
    print(f"input pipeline share of a step on {device} "
          f"({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}), "
          f"target <= {TARGET:.0%}")
    print(f"{'model':6} {'batch':>5} {'pipeline µs':>12} {'step µs':>9} {'share':>7}")
    for r in rows:
        flag = "" if r["share"] <= TARGET else "  FAIL"
        print(f"{r['model']:6} {r['batch_size']:>5} {r['pipeline_us']:>12.1f} "
              f"{r['step_us']:>9.1f} {r['share']:>7.1%}{flag}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": str(device), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
