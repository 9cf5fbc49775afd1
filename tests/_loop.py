"""A minimal stand-in for the trial loop's scheduling contract, for optimizer-family tests:
per epoch, build the family's sampler; before each step run the iteration periodics due at
the global iteration counter; after each epoch run the epoch periodics due at the number of
finished epochs. Returns the gradient evaluations spent (steps + periodic work).

Also what checks of the state the loop carries need: ``checkpoint`` / ``restore`` (what a
trial saves at an epoch end and loads into a freshly built optimizer), ``reloaded`` (any
state through ``torch.save``/``torch.load``, as checkpoints go) and ``assert_same``
(bit-for-bit equality of nested states)."""
from __future__ import annotations

import io
import math
from dataclasses import replace
from typing import Any

import torch

from study.data import DataSplit, epoch_generator
from study.optim.base import Context, Optimizer
from study.trial import scheduled_work

PERIODIC_STREAM = 1


def make_context(opt: Optimizer, train: DataSplit, batch_size: int, seed: int = 0) -> Context:
    return Context(opt.model, opt.loss_fn, train, batch_size, 0, 0,
                   epoch_generator(seed, 0, PERIODIC_STREAM))


def run_epochs(opt: Optimizer, ctx: Context, epochs: int, seed: int = 0,
               costs: list[tuple[str | int, Any]] | None = None) -> int:
    """Train from ``ctx.epoch`` for ``epochs`` epochs (advancing ``ctx``'s counters).

    ``costs``, when given, collects what each piece of work reported: ``("direction",
    grad_evals)`` per step and ``(i, cost)`` per run of the i-th of ``opt.periodic()``."""
    periodics = opt.periodic()
    if costs is not None:
        periodics = [replace(p, run=_logged(p.run, i, costs)) for i, p in enumerate(periodics)]
    cost = 0
    for _ in range(epochs):
        # periodic work draws from its own per-epoch stream, so a resumed run matches
        ctx.generator = epoch_generator(seed, ctx.epoch, PERIODIC_STREAM)
        sampler = opt.sampler(len(ctx.train), ctx.batch_size, epoch_generator(seed, ctx.epoch))
        for idx in sampler:
            cost += scheduled_work(periodics, ctx, ctx.iteration)
            d = opt.direction(ctx.train.batch(idx))
            opt.step(d)
            if costs is not None:
                costs.append(("direction", d.grad_evals))
            cost += d.grad_evals
            ctx.iteration += 1
        ctx.epoch += 1
        cost += scheduled_work(periodics, ctx, ctx.epoch, "epoch")
    return cost


def _logged(run, index: int, costs: list):
    def logged(ctx: Context):
        cost = run(ctx)
        costs.append((index, cost))
        return cost
    return logged


def reloaded(state: Any) -> Any:
    """``state`` after ``torch.save`` and ``torch.load`` (as the trial's checkpoints go):
    a copy that shares nothing with the live objects it was taken from."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


def checkpoint(opt: Optimizer, ctx: Context) -> dict[str, Any]:
    """The weights, the optimizer state and the loop's counters, through torch.save."""
    return reloaded({"model": opt.model.state_dict(), "optimizer": opt.state_dict(),
                     "iteration": ctx.iteration, "epoch": ctx.epoch})


def restore(opt: Optimizer, ctx: Context, state: dict[str, Any]) -> None:
    """Load a ``checkpoint`` into a freshly built optimizer (and its model) and context."""
    opt.model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    ctx.iteration, ctx.epoch = state["iteration"], state["epoch"]


def assert_same(a: Any, b: Any, where: str = "state") -> None:
    """Bit-for-bit equality of nested dicts / lists / tuples of tensors and plain values
    (tensors: same dtype, shape and values, NaN equal to NaN); ``where`` names the first
    difference."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), f"{where}: tensor vs {type(b).__name__}"
        assert (a.dtype, a.shape) == (b.dtype, b.shape), \
            f"{where}: {a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}"
        assert torch.equal(a, b) or (a.is_floating_point() and torch.allclose(
            a, b, rtol=0, atol=0, equal_nan=True)), f"{where}: values differ"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b), \
            f"{where}: keys {list(a)} vs {list(b) if isinstance(b, dict) else type(b).__name__}"
        for key in a:
            assert_same(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), f"{where}: {a!r} vs {b!r}"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and math.isnan(a):
        assert isinstance(b, float) and math.isnan(b), f"{where}: nan vs {b!r}"
    else:
        assert type(a) is type(b) and a == b, f"{where}: {a!r} vs {b!r}"


def trial_resumes_exactly(tmp_path, family: str, variant: str, options: dict,
                          data_root=None):
    """Run a tiny MNIST-1D trial through the real trial loop, once straight and once
    interrupted after epoch 2 and resumed from its checkpoint (through torch.save); assert
    identical final weights and cost. ``data_root`` (default ``tmp_path``) is where the
    dataset is generated and cached: tests that run many trials share one. Returns the last
    epoch's metrics and the training set size."""
    from study.spec import parse_spec
    from study.trial import load_splits, run_trial

    root = tmp_path if data_root is None else data_root
    spec = parse_spec({
        "name": "t", "dataset": {"name": "mnist1d", "size": 600, "root": str(root)},
        "models": [{"name": "mlp", "widths": [16]}], "epochs": 4, "lr": [0.1],
        "batch_size": [32], "families": {family: {"variants": [variant], "options": options}},
        "measure": {"every": 0, "histograms": False}})
    config = spec.trial_config(spec.trials()[0])
    runs = {}
    for name, kwargs in (("full", {}), ("part", {"stop_after": 2})):
        runs[name] = []
        run_trial(config, report=lambda m, s, r=runs[name]: r.append((m, s)), **kwargs)
    torch.save(runs["part"][-1][1], tmp_path / "state.pt")
    state = torch.load(tmp_path / "state.pt", weights_only=False)
    rest = []
    run_trial(config, report=lambda m, s: rest.append((m, s)), state=state)
    full_metrics, full_state = runs["full"][-1]
    for key, value in full_state["model"].items():
        assert torch.equal(value, rest[-1][1]["model"][key]), key
    assert full_metrics["grad_evals"] == rest[-1][0]["grad_evals"]
    return full_metrics, len(load_splits(spec.dataset)[0])
