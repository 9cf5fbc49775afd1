"""A minimal stand-in for the trial loop's scheduling contract, for optimizer-family tests:
per epoch, build the family's sampler; before each step run the iteration periodics due at
the global iteration counter; after each epoch run the epoch periodics due at the number of
finished epochs. Returns the gradient evaluations spent (steps + periodic work)."""
from __future__ import annotations

import torch

from study.data import DataSplit, epoch_generator
from study.optim.base import Context, Optimizer
from study.trial import scheduled_work

PERIODIC_STREAM = 1


def make_context(opt: Optimizer, train: DataSplit, batch_size: int, seed: int = 0) -> Context:
    return Context(opt.model, opt.loss_fn, train, batch_size, 0, 0,
                   epoch_generator(seed, 0, PERIODIC_STREAM))


def run_epochs(opt: Optimizer, ctx: Context, epochs: int, seed: int = 0) -> int:
    """Train from ``ctx.epoch`` for ``epochs`` epochs (advancing ``ctx``'s counters)."""
    periodics = opt.periodic()
    cost = 0
    for _ in range(epochs):
        # periodic work draws from its own per-epoch stream, so a resumed run matches
        ctx.generator = epoch_generator(seed, ctx.epoch, PERIODIC_STREAM)
        sampler = opt.sampler(len(ctx.train), ctx.batch_size, epoch_generator(seed, ctx.epoch))
        for idx in sampler:
            cost += scheduled_work(periodics, ctx, ctx.iteration)
            d = opt.direction(ctx.train.batch(idx))
            opt.step(d)
            cost += d.grad_evals
            ctx.iteration += 1
        ctx.epoch += 1
        cost += scheduled_work(periodics, ctx, ctx.epoch, "epoch")
    return cost


def trial_resumes_exactly(tmp_path, family: str, variant: str, options: dict):
    """Run a tiny MNIST-1D trial through the real trial loop, once straight and once
    interrupted after epoch 2 and resumed from its checkpoint (through torch.save); assert
    identical final weights and cost. Returns the last epoch's metrics and the training
    set size."""
    from study.spec import parse_spec
    from study.trial import load_splits, run_trial

    spec = parse_spec({
        "name": "t", "dataset": {"name": "mnist1d", "size": 600, "root": str(tmp_path)},
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
