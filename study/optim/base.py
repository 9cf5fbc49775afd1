"""The one interface every optimizer family implements.

An optimizer family is a *direction estimator* plus an *update rule* (optax style: explicit
state, no hidden globals). The trial loop, the variance measurement and the logging only ever
talk to this interface, so none of them special-cases a family:

- ``direction(batch)`` returns the step direction this optimizer would take on ``batch``
  (SGD: the mini-batch gradient; SNR: the noise-scaled gradient; K-FAC: the preconditioned
  gradient; SVRG: gradient + control variate; GC: the stratified estimate). It must be *pure*:
  it reads the optimizer state but never changes it, so the variance measurement can call it
  as often as it likes without disturbing training.
- ``step(direction)`` applies a direction with the current learning rate and updates state.
- ``periodic()`` declares the family's scheduled work: *frequent* (about one gradient, e.g.
  K-FAC factors) and *snapshot* (about a pass over the training set, e.g. SVRG's full
  gradient). The trial loop runs it on schedule and adds the cost it returns to the trial's
  gradient-evaluation count.
- ``sampler(...)`` lets a family replace uniform sampling (GC's stratified sampler).
- ``state_dict()`` / ``load_state_dict()`` make checkpoints exact.

Optimizers never import Ray or MLflow.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from study.data import Batch, DataSplit, UniformSampler
from study.optim.options import FamilyOptions, StepOptions, parse_options
from study.optim.update import SGDRule, UpdateRule

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``loss_fn(logits, targets)`` -> per-example losses (reduction='none')."""


@dataclass
class Direction:
    """A step direction and what it cost.

    ``tensors`` has one tensor per trainable parameter (same order and shapes as
    ``Optimizer.params``). ``loss`` is the mean loss on the batch at the current weights.
    ``grad_evals`` counts examples pushed through a backward pass to produce it.
    ``extras`` carries family by-products that ``step`` may use (e.g. the raw gradient).
    """

    tensors: list[torch.Tensor]
    loss: float
    grad_evals: int
    extras: dict[str, Any] = field(default_factory=dict)


@dataclass
class Context:
    """What scheduled work may use: the model, the loss, the whole training split."""

    model: nn.Module
    loss_fn: LossFn
    train: DataSplit
    batch_size: int
    iteration: int
    epoch: int
    generator: torch.Generator


@dataclass
class Periodic:
    """Scheduled work declared by a family.

    Runs when ``counter % every == 0`` where the counter is the iteration (``unit='iter'``,
    checked before each step, so ``at iteration 0`` is included) or the number of finished
    epochs (``unit='epoch'``, checked at the end of each epoch). ``run`` returns its cost in
    gradient evaluations (examples through a backward pass; a forward-only pass counts 0).
    ``size`` says how big one run is, for reports and benchmarks: about one mini-batch
    (``"minibatch"``: K-FAC's factors, a GC EM step) or about the training set, done rarely
    (``"dataset"``: SVRG's full gradient, GC's re-clustering, an epoch-end summary, K-FAC's
    eigendecompositions).
    """

    size: Literal["minibatch", "dataset"]
    every: int
    unit: Literal["iter", "epoch"]
    run: Callable[[Context], int]

    def due(self, unit: str, counter: int) -> bool:
        return self.unit == unit and self.every > 0 and counter % self.every == 0


def scheduled_work(periodic: list[Periodic], ctx: Context, counter: int, unit: str = "iter"
                   ) -> int:
    """Run the work of ``unit`` due at ``counter`` (the iteration about to step, or the number
    of finished epochs); return its cost in gradient evaluations."""
    if unit == "iter":
        ctx.iteration = counter
    return sum(work.run(ctx) for work in periodic if work.due(unit, counter))


class Optimizer:
    """Base class: the plain mini-batch gradient, applied by SGD with the options' momentum.

    Subclasses set ``family``, ``variants`` (the first is the default) and ``Options`` (a
    ``FamilyOptions`` model: typed fields with defaults and constraints, checked by the spec
    for every grid point) and override ``direction`` and, where needed, ``make_rule``,
    ``step``, ``periodic``, ``sampler``, ``metrics`` and the state.
    """

    family: ClassVar[str] = ""
    variants: ClassVar[tuple[str, ...]] = ()
    Options: ClassVar[type[FamilyOptions]] = StepOptions

    def __init__(self, model: nn.Module, loss_fn: LossFn, lr: float, variant: str | None = None,
                 **options: Any):
        if lr <= 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        variant = variant or self.variants[0]
        if variant not in self.variants:
            raise ValueError(f"{self.family}: unknown variant {variant!r}; "
                             f"choose from {list(self.variants)}")
        self.model = model
        self.loss_fn = loss_fn
        self.lr = float(lr)
        self.variant = variant
        self.opts = parse_options(self.Options, self.family, variant, options)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.rule: UpdateRule = self.make_rule()

    # -- what a family overrides -------------------------------------------------------------
    def make_rule(self) -> UpdateRule:
        """The update rule that turns directions into steps (SGD with heavy-ball momentum)."""
        return SGDRule(self.opts.momentum, weight_decay=self.opts.weight_decay)

    def direction(self, batch: Batch) -> Direction:
        grads, loss = gradient(self.model, self.loss_fn, batch, self.params)
        return Direction(grads, loss, grad_evals=len(batch))

    def step(self, direction: Direction) -> None:
        self.rule.apply(self.params, direction.tensors, self.lr)

    def update_direction(self, direction: Direction) -> list[torch.Tensor]:
        """The step ``step(direction)`` would take, per unit of lr (θ ← θ − lr·this), with no
        state changed: momentum buffer, Nesterov look-ahead, Adam's m̂/(√v̂+ε) included. This
        is what the variance probe measures (gvar_code's ``estim/heavyball.py``/``adam.py``:
        the variance of the update actually applied, not of the raw gradient)."""
        return self.rule.preview(self.params, direction.tensors)

    def steps_along_direction(self) -> bool:
        """Whether every update is the direction itself (no momentum, decay, adaptivity)."""
        return (type(self).update_direction is Optimizer.update_direction
                and self.rule.is_identity())

    def periodic(self) -> list[Periodic]:
        return []

    def metrics(self) -> dict[str, float]:
        """Family-specific numbers logged at every epoch's end (none by default)."""
        return {}

    def sampler(self, n: int, batch_size: int, generator: torch.Generator):
        """The training sampler for one epoch; uniform without replacement by default."""
        return UniformSampler(n, batch_size, generator)

    def state_dict(self) -> dict[str, Any]:
        return {"rule": self.rule.state_dict(), "lr": self.lr}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rule.load_state_dict(state["rule"])
        self.lr = state["lr"]


def gradient(model: nn.Module, loss_fn: LossFn, batch: Batch, params: list[torch.Tensor],
             weights: torch.Tensor | None = None) -> tuple[list[torch.Tensor], float]:
    """Mean (optionally example-weighted) loss gradient, without touching ``p.grad``."""
    losses = loss_fn(model(batch.x), batch.y)
    loss = (losses * weights).mean() if weights is not None else losses.mean()
    grads = torch.autograd.grad(loss, params)
    return list(grads), float(losses.detach().mean())
