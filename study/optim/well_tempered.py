"""Well-tempered backprop (ansuini/WellTemperedSGD).

Per parameter entry, the mini-batch gradients g_1..g_B of a window give m1 = Σg/B,
m2 = Σg²/B, the standard error err = sqrt((m2 − m1²)/B) (err == 0 -> 1e-8) and
snr = |m1|/err. Entries whose mean is not resolved above its standard error are damped.

- ``epoch`` (``wtb.py``, 2019): the window is the previous epoch's mini-batches; every step
  of the next epoch uses the mini-batch gradient with entries where snr < 1 scaled by snr
  (the first epoch is unscaled, snr = 1). The snr is formed by an epoch-end snapshot that
  costs no gradient evaluations (it only reads the accumulators).
- ``accumulate`` (``wtsgd.py``, 2018): the window is n consecutive mini-batches; after the
  n-th, one update with Ā·min(s, 1), s = |Ā|/(σ/√n) (σ the population std of the n
  gradients; ``where(s>1, g/n, s·g/n)`` of the original). Steps in between only accumulate.

``direction`` stays pure: it returns the (scaled) mini-batch gradient and passes the raw
gradient in ``extras['raw']``; ``step`` accumulates it and updates.
"""
from __future__ import annotations

from typing import Annotated, Any

import torch
from pydantic import Field

from study.optim.base import Direction, Optimizer, Periodic, gradient
from study.optim.options import StepOptions
from study.optim.registry import register

ZERO_ERROR = 1e-8


def standard_error_snr(total: torch.Tensor, total_sq: torch.Tensor, count: int) -> torch.Tensor:
    """|m1| / sqrt((m2 − m1²)/count); a zero error (rounding may make it negative) -> 1e-8."""
    m1, m2 = total / count, total_sq / count
    err = ((m2 - m1 * m1).clamp(min=0) / count).sqrt()
    err = torch.where(err == 0, torch.full_like(err, ZERO_ERROR), err)
    return m1.abs() / err


def damping(snr: torch.Tensor) -> torch.Tensor:
    """The factor min(snr, 1): ``g·min(snr, 1)`` is ``where(snr<1, snr·g, g)`` in one pass."""
    return snr.clamp(max=1)


class WellTemperedOptions(StepOptions):
    n: Annotated[int, Field(ge=2)] = 10   # accumulate: mini-batches per update


@register
class WellTempered(Optimizer):
    family = "well_tempered"
    variants = ("epoch", "accumulate")
    Options = WellTemperedOptions

    def __init__(self, model, loss_fn, lr, variant=None, **options):
        super().__init__(model, loss_fn, lr, variant, **options)
        self.n = self.opts.n
        names = {p: name for name, p in model.named_parameters()}
        self.names = [names[p] for p in self.params]
        self.total: list[torch.Tensor] | None = None
        self.total_sq: list[torch.Tensor] | None = None
        self.count = 0
        self.snr: list[torch.Tensor] | None = None   # the ratios in force (epoch variant)
        self.factor: list[torch.Tensor] | None = None  # min(snr, 1), what steps multiply by
        self.fractions: list[float] = [0.0] * len(self.params)

    def direction(self, batch) -> Direction:
        grads, loss = gradient(self.model, self.loss_fn, batch, self.params)
        tensors = grads
        if self.variant == "epoch" and self.factor is not None:
            tensors = [g * f for g, f in zip(grads, self.factor)]
        return Direction(tensors, loss, grad_evals=len(batch), extras={"raw": grads})

    @torch.no_grad()
    def step(self, direction: Direction) -> None:
        self._accumulate(direction.extras.get("raw", direction.tensors))
        if self.variant == "epoch":
            self.rule.apply(self.params, direction.tensors, self.lr)
        elif self.count == self.n:
            snr = [standard_error_snr(t, q, self.count) for t, q in zip(self.total, self.total_sq)]
            mean = [t / self.count for t in self.total]
            self._set_fractions(snr)
            self.rule.apply(self.params, [m.mul_(damping(s)) for m, s in zip(mean, snr)],
                            self.lr)
            self._reset()

    @torch.no_grad()
    def update_direction(self, direction: Direction) -> list[torch.Tensor]:
        """``epoch``: the scaled gradient through the rule. ``accumulate``: the update the
        window would apply if it ended with this batch (Ā·min(s, 1) over the accumulated
        gradients and this one), through the rule; no accumulator changes."""
        if self.variant == "epoch":
            return super().update_direction(direction)
        raw = direction.extras.get("raw", direction.tensors)
        if self.total is None:
            total, total_sq, count = [g.clone() for g in raw], [g * g for g in raw], 1
        else:
            total = [t + g for t, g in zip(self.total, raw)]
            total_sq = [q.addcmul(g, g) for q, g in zip(self.total_sq, raw)]
            count = self.count + 1
        update = [(t / count).mul_(damping(standard_error_snr(t, q, count)))
                  for t, q in zip(total, total_sq)]
        return self.rule.preview(self.params, update)

    def periodic(self) -> list[Periodic]:
        if self.variant != "epoch":
            return []
        return [Periodic("dataset", 1, "epoch", self._end_epoch)]

    def _end_epoch(self, ctx) -> int:
        """Form the snr for the next epoch from this epoch's gradients (no new gradients)."""
        if self.count > 0:
            self.snr = [standard_error_snr(t, q, self.count)
                        for t, q in zip(self.total, self.total_sq)]
            self.factor = [damping(s) for s in self.snr]
            self._set_fractions(self.snr)
        self._reset()
        return 0

    def metrics(self) -> dict[str, float]:
        """Fraction of entries damped (snr < 1), per parameter and overall."""
        out = {f"wt/frac_scaled/{name}": f for name, f in zip(self.names, self.fractions)}
        sizes = [p.numel() for p in self.params]
        out["wt/frac_scaled"] = sum(f * s for f, s in zip(self.fractions, sizes)) / sum(sizes)
        return out

    def _accumulate(self, grads: list[torch.Tensor]) -> None:
        if self.total is None:
            self.total = [g.detach().clone() for g in grads]
            self.total_sq = [g.detach() * g.detach() for g in grads]
        else:
            for t, q, g in zip(self.total, self.total_sq, grads):
                t.add_(g)
                q.addcmul_(g, g)
        self.count += 1

    def _reset(self) -> None:
        self.total, self.total_sq, self.count = None, None, 0

    def _set_fractions(self, snr: list[torch.Tensor]) -> None:
        self.fractions = [float((s < 1).float().mean()) for s in snr]

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "total": _copy(self.total),
                "total_sq": _copy(self.total_sq), "count": self.count, "snr": _copy(self.snr),
                "fractions": list(self.fractions)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.total, self.total_sq = _copy(state["total"]), _copy(state["total_sq"])
        self.count, self.snr = state["count"], _copy(state["snr"])
        self.factor = None if self.snr is None else [damping(s) for s in self.snr]
        self.fractions = list(state["fractions"])


def _copy(tensors: list[torch.Tensor] | None) -> list[torch.Tensor] | None:
    """Checkpoints hold copies, never the live accumulators."""
    return None if tensors is None else [t.clone() for t in tensors]
