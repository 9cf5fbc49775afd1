"""K-FAC (Martens & Grosse 2015) as Faghri et al. ran it: alecwangcq/KFAC-Pytorch
(``optimizers/kfac.py``) on the family interface.

- *frequent* work (every ``t_cov`` iterations, one mini-batch backward): the Kronecker
  factors A and G of every Linear/Conv1d/Conv2d layer from the **true** Fisher (labels
  sampled from the model's softmax with the trial's generator), as running averages that
  start from the identity, as in the reference;
- *snapshot* work (every ``t_inv`` iterations, no gradients): eigendecompositions of A and G;
- ``direction``: the gradient preconditioned by ``(G⊗A + damping·I)^{-1}`` layer by layer
  (weight and bias together as ``[W|b]``), other parameters (e.g. GroupNorm) unchanged, then
  the KL clip ``ν = min(1, sqrt(kl_clip / Σ V·∇·lr²)))`` on the preconditioned layers (the
  reference scales only those);
- ``step``: momentum SGD; weight decay starts after ``20·t_cov`` steps, as in the reference.

Before the first inverse exists (the trial runs iteration 0's frequent then snapshot work
before the first step, so only outside a trial) ``direction`` is the plain gradient.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from study.grads.capture import capture
from study.grads.layer_types import Requirements, kronecker_layers, unsupported
from study.optim.base import Context, Direction, Optimizer, Periodic, gradient
from study.optim.kfac.factors import (
    Eigenbasis,
    a_statistic,
    g_statistic,
    running_average,
    sample_labels,
)
from study.optim.options import Count, Fraction, Momentum, Positive, StepOptions
from study.optim.registry import register
from study.optim.update import SGDRule

NEEDS = Requirements(ungrouped=True, all_trainable=True)
"""K-FAC preconditions each layer's whole ``[W|b]`` matrix: one per layer (no groups), every
part of it trained. Other layers keep the plain gradient."""

WEIGHT_DECAY_DELAY = 20
"""Weight decay applies after this many ``t_cov`` periods (the reference's ``20·TCov``)."""


def kfac_layers(model: nn.Module) -> list[nn.Module]:
    """The layers K-FAC preconditions, in ``model.parameters()`` order."""
    return [m for m in kronecker_layers(model) if unsupported(m, NEEDS) is None]


class KFACOptions(StepOptions):
    momentum: Momentum = 0.9
    damping: Positive = 1e-3
    stat_decay: Fraction = 0.95
    kl_clip: Positive = 1e-2
    t_cov: Count = 10                 # iterations between factor updates (frequent work)
    t_inv: Count = 100                # iterations between eigendecompositions (snapshots)


@register
class KFAC(Optimizer):
    family = "kfac"
    variants = ("kfac",)
    Options = KFACOptions

    def __init__(self, model, loss_fn, lr, variant=None, **options):
        super().__init__(model, loss_fn, lr, variant, **options)
        self.layers = kfac_layers(model)
        position = {id(p): i for i, p in enumerate(self.params)}
        self.slots = [(position[id(m.weight)],
                       position[id(m.bias)] if m.bias is not None else None)
                      for m in self.layers]
        n = len(self.layers)
        self.a_factors: list[torch.Tensor | None] = [None] * n
        self.g_factors: list[torch.Tensor | None] = [None] * n
        self.bases: list[Eigenbasis | None] = [None] * n
        self.factor_updates = 0
        self.inverse_updates = 0

    def make_rule(self) -> SGDRule:
        """Momentum SGD; weight decay from step 20·t_cov on, as in the reference."""
        o = self.opts
        return SGDRule(o.momentum, weight_decay=o.weight_decay,
                       decay_after=WEIGHT_DECAY_DELAY * o.t_cov)

    @property
    def steps(self) -> int:
        return self.rule.steps

    # -- direction and step ----------------------------------------------------------------
    def direction(self, batch) -> Direction:
        grads, loss = gradient(self.model, self.loss_fn, batch, self.params)
        if not self.layers or any(b is None for b in self.bases):
            return Direction(grads, loss, len(batch), {"preconditioned": False})
        with torch.no_grad():
            rotated = [basis.rotate(grads[iw], None if ib is None else grads[ib])
                       for basis, (iw, ib) in zip(self.bases, self.slots)]
            scaled = [r[0] for r in rotated]
            vg = torch.stack([r[1] for r in rotated]).sum() * self.lr ** 2
            nu = (self.opts.kl_clip / vg.clamp_min(0)).sqrt().clamp(max=1.0)  # vg = 0 -> 1
            torch._foreach_mul_(scaled, nu)
            tensors = list(grads)
            for basis, (iw, ib), r in zip(self.bases, self.slots, scaled):
                tensors[iw], v_b = basis.unrotate(r, grads[iw].shape)
                if ib is not None:
                    tensors[ib] = v_b
        return Direction(tensors, loss, len(batch), {"preconditioned": True, "nu": nu})

    def update_direction(self, direction: Direction) -> list[torch.Tensor]:
        """The update without the KL clip, as gvar_code measures K-FAC (its measurement path
        ``apply_precond_outplace`` has the clip commented out): ν only rescales the whole step
        by a factor set by lr and the trust region, not by the gradient's noise."""
        tensors = list(direction.tensors)
        nu = direction.extras.get("nu")
        if nu is not None:
            for iw, ib in self.slots:
                tensors[iw] = tensors[iw] / nu
                if ib is not None:
                    tensors[ib] = tensors[ib] / nu
        return self.rule.preview(self.params, tensors)

    # -- scheduled work --------------------------------------------------------------------
    def periodic(self) -> list[Periodic]:
        return [Periodic("minibatch", self.opts.t_cov, "iter", self.update_factors),
                Periodic("dataset", self.opts.t_inv, "iter", self.update_inverses)]

    def update_factors(self, ctx: Context) -> int:
        """One backward of the sampled-label loss on a random mini-batch; cost B."""
        gen = ctx.generator
        # With replacement: a Fisher estimate does not mind, and randperm(N) costs more
        # than the factors on small models.
        idx = torch.randint(len(ctx.train), (ctx.batch_size,), generator=gen, device=gen.device)
        batch = ctx.train.batch(idx)
        with capture(self.model, self.layers) as records:
            logits = self.model(batch.x)
            labels = sample_labels(logits, gen)
            torch.autograd.grad(F.cross_entropy(logits, labels), self.params)
        with torch.no_grad():
            for i, layer in enumerate(self.layers):
                rec = records.records[layer]
                self.a_factors[i] = running_average(
                    self.a_factors[i], a_statistic(layer, rec.a), self.opts.stat_decay)
                self.g_factors[i] = running_average(
                    self.g_factors[i], g_statistic(layer, rec.g, len(batch)),
                    self.opts.stat_decay)
        self.factor_updates += 1
        return len(batch)

    def update_inverses(self, ctx: Context | None = None) -> int:
        """Eigendecompose every factor (no gradients: cost 0). Skipped before any factors."""
        if any(a is None for a in self.a_factors):
            return 0
        with torch.no_grad():
            self.bases = [Eigenbasis.of(a, g, self.opts.damping, layer.bias is not None)
                          for a, g, layer in zip(self.a_factors, self.g_factors, self.layers)]
        self.inverse_updates += 1
        return 0

    # -- checkpoints -----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        def copies(xs):
            return [None if x is None else x.clone() for x in xs]
        return {**super().state_dict(), "steps": self.steps,
                "factor_updates": self.factor_updates, "inverse_updates": self.inverse_updates,
                "a_factors": copies(self.a_factors), "g_factors": copies(self.g_factors),
                "bases": [None if b is None else b.state() for b in self.bases]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if len(state["a_factors"]) != len(self.layers):
            raise ValueError(f"kfac: checkpoint has {len(state['a_factors'])} K-FAC layers, "
                             f"this model has {len(self.layers)}")
        super().load_state_dict(state)
        self.factor_updates = state["factor_updates"]
        self.inverse_updates = state["inverse_updates"]
        self.a_factors = [None if x is None else x.clone() for x in state["a_factors"]]
        self.g_factors = [None if x is None else x.clone() for x in state["g_factors"]]
        self.bases = [None if b is None else Eigenbasis.from_state(b, layer.bias is not None)
                      for b, layer in zip(state["bases"], self.layers)]
