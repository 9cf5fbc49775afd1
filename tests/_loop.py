"""A minimal stand-in for the trial loop's scheduling contract, for optimizer-family tests:
per epoch, build the family's sampler; before each step run the iteration periodics due at
the global iteration counter; after each epoch run the epoch periodics due at the number of
finished epochs. Returns the gradient evaluations spent (steps + periodic work)."""
from __future__ import annotations

import pytest
import torch

from study.data import DataSplit, epoch_generator
from study.optim.base import Context, Optimizer

PERIODIC_STREAM = 1


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors on a shared 2-core machine: intra-op threads only add contention
    (measured 30x slower under load), so these tests run single-threaded."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


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
            cost += sum(p.run(ctx) for p in periodics if p.due("iter", ctx.iteration))
            d = opt.direction(ctx.train.batch(idx))
            opt.step(d)
            cost += d.grad_evals
            ctx.iteration += 1
        ctx.epoch += 1
        cost += sum(p.run(ctx) for p in periodics if p.due("epoch", ctx.epoch))
    return cost
