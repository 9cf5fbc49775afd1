"""SVRG (Johnson & Zhang 2013) as in Faghri et al.'s ``estim/svrg.py``.

A snapshot keeps a frozen copy of the weights ``w_snap`` and the full-batch mean gradient
``mu = (1/N) Σ_i ∇loss_i(w_snap)``. The direction on a batch B is the control-variate estimate

    d = mu − ∇L_B(w_snap) + ∇L_B(w),

the same batch through the snapshot and the current weights (2·|B| gradient evaluations).
It is unbiased for the full gradient at ``w`` and equals it exactly when ``w = w_snap``.

Snapshot schedule. A direction needs a snapshot, and ``direction`` must stay pure, so the
first snapshot is guaranteed by the schedule, never taken lazily:
- ``snapshot_unit='iter'``: one periodic every ``snapshot_every`` iterations; iteration 0 is
  due, so the first snapshot precedes the first step.
- ``snapshot_unit='epoch'``: a periodic at the end of every ``snapshot_every`` epochs plus a
  bootstrap periodic in iteration units that is due only at iteration 0 (and costs nothing
  when a snapshot already exists, e.g. after resuming). The snapshot at the end of the last
  epoch is spent work (cost N, counted) because the trial loop runs epoch periodics after
  every epoch; the alternative, an every-iteration check, would hide the schedule.

The snapshot is a parameter dict used through ``torch.func.functional_call``, so no second
module is built and the live model is never touched.
"""
from __future__ import annotations

from typing import Any, Literal

import torch
from torch.func import functional_call

from study.data import Batch, DataSplit
from study.optim.base import Context, Direction, LossFn, Optimizer, Periodic, gradient
from study.optim.options import Count, StepOptions
from study.optim.registry import register

FULL_PASS_BATCH = 1024
"""Examples per chunk in full passes over the training set (memory bound, not semantics)."""

ONLY_AT_START = 2 ** 62
"""An iteration period so long that ``counter % every == 0`` holds only at iteration 0."""


def snapshot_periodics(every: int, unit: str, run, bootstrap) -> list[Periodic]:
    """Snapshot work every ``every`` ``unit``s that also happens before the first step.

    ``bootstrap(ctx)`` runs at iteration 0 when ``unit='epoch'`` (epoch periodics only run at
    epoch ends); it should return 0 when there is nothing to do."""
    periodics = [Periodic("dataset", int(every), unit, run)]
    if unit == "epoch":
        periodics.insert(0, Periodic("dataset", ONLY_AT_START, "iter", bootstrap))
    return periodics


def full_gradient(model: torch.nn.Module, loss_fn: LossFn, split: DataSplit,
                  params: list[torch.Tensor], chunk: int = FULL_PASS_BATCH) -> list[torch.Tensor]:
    """Mean per-example loss gradient over a whole split, accumulated in chunks."""
    total = [torch.zeros_like(p) for p in params]
    for batch in split.batches(chunk):
        losses = loss_fn(model(batch.x), batch.y)
        for t, g in zip(total, torch.autograd.grad(losses.sum(), params)):
            t.add_(g)
    return [t.div_(len(split)) for t in total]


class SVRGOptions(StepOptions):
    snapshot_every: Count = 1
    snapshot_unit: Literal["iter", "epoch"] = "epoch"


@register
class SVRG(Optimizer):
    family = "svrg"
    variants = ("svrg",)
    Options = SVRGOptions

    def __init__(self, model, loss_fn, lr, variant=None, **options):
        super().__init__(model, loss_fn, lr, variant, **options)
        self.param_names = [n for n, p in model.named_parameters() if p.requires_grad]
        self.snap_params: dict[str, torch.Tensor] | None = None
        self.snap_buffers: dict[str, torch.Tensor] = {}
        self.mu: list[torch.Tensor] | None = None

    def periodic(self) -> list[Periodic]:
        return snapshot_periodics(self.opts.snapshot_every, self.opts.snapshot_unit,
                                  self.take_snapshot, self._bootstrap)

    def _bootstrap(self, ctx: Context) -> int:
        return 0 if self.snap_params is not None else self.take_snapshot(ctx)

    def take_snapshot(self, ctx: Context) -> int:
        """Freeze the current weights and compute the full gradient there; cost N."""
        self.mu = full_gradient(self.model, self.loss_fn, ctx.train, self.params,
                                max(FULL_PASS_BATCH, ctx.batch_size))
        self.snap_params = {n: p.detach().clone().requires_grad_(True)
                            for n, p in zip(self.param_names, self.params)}
        self.snap_buffers = {n: b.detach().clone() for n, b in self.model.named_buffers()}
        return len(ctx.train)

    def snapshot_gradient(self, batch: Batch) -> list[torch.Tensor]:
        """∇L_B at the snapshot weights (the live model is not modified)."""
        weights = {**self.snap_buffers, **self.snap_params}
        losses = self.loss_fn(functional_call(self.model, weights, (batch.x,)), batch.y)
        return list(torch.autograd.grad(losses.mean(), list(self.snap_params.values())))

    def direction(self, batch: Batch) -> Direction:
        if self.snap_params is None or self.mu is None:
            raise RuntimeError("svrg: direction() before the first snapshot; the trial loop "
                               "must run periodic() work due at iteration 0 first")
        current, loss = gradient(self.model, self.loss_fn, batch, self.params)
        old = self.snapshot_gradient(batch)
        tensors = [m - o + c for m, o, c in zip(self.mu, old, current)]
        return Direction(tensors, loss, grad_evals=2 * len(batch))

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["snapshot"] = None if self.snap_params is None else {
            "params": {n: t.detach() for n, t in self.snap_params.items()},
            "buffers": dict(self.snap_buffers), "mu": list(self.mu)}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        snap = state["snapshot"]
        if snap is None:
            self.snap_params, self.snap_buffers, self.mu = None, {}, None
            return
        self.snap_params = {n: t.detach().clone().requires_grad_(True)
                            for n, t in snap["params"].items()}
        self.snap_buffers = {n: t.clone() for n, t in snap["buffers"].items()}
        self.mu = [t.clone() for t in snap["mu"]]
