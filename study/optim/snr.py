"""Signal-to-noise gradients (kaifishr/SignalNoiseGradients, ``model.py``).

From the per-example gradients of the mini-batch (population statistics, ddof=0), each
parameter entry has a mean μ and a standard deviation σ; the step direction damps entries
whose mean is small relative to their spread:

- I:   μ·min(1/(α·σ + ε), 1)        (α = 1.0; the variant sngrad actually uses)
- II:  μ·min(μ²/(α·σ² + ε), 1)      (α = 0.05)
- III: μ·(1 − min(α·σ, 1))          (α = 1.0)

μ and σ come from ``study.grads.batch_stats`` (one forward + one backward), so a step costs
B gradient evaluations like SGD.
"""
from __future__ import annotations

import torch

from study.grads import batch_stats
from study.optim.base import Direction, Optimizer
from study.optim.options import NonNegative, Positive, StepOptions
from study.optim.registry import register

DEFAULT_ALPHA = {"I": 1.0, "II": 0.05, "III": 1.0}


def snr_scaled(variant: str, total: torch.Tensor, total_sq: torch.Tensor, n: int,
               alpha: float, eps: float) -> torch.Tensor:
    """The noise-scaled mean of one parameter from Σg and Σg² over n examples (formulas in
    the module docstring; in-place on fresh temporaries: these passes over every parameter
    are memory-bound and cost as much as a matmul for wide layers)."""
    mean = total / n
    var = (total_sq / n).addcmul_(mean, mean, value=-1).clamp_(min=0)
    if variant == "I":
        return mean.mul_(var.sqrt_().mul_(alpha).add_(eps).reciprocal_().clamp_(max=1.0))
    if variant == "II":
        return mean.mul_((mean * mean).div_(var.mul_(alpha).add_(eps)).clamp_(max=1.0))
    if variant == "III":
        return mean.mul_(var.sqrt_().mul_(alpha).clamp_(max=1.0).neg_().add_(1.0))
    raise ValueError(f"snr: unknown variant {variant!r}")


class SNROptions(StepOptions):
    alpha: Positive | None = None     # None: the variant's default (DEFAULT_ALPHA)
    eps: NonNegative = 1e-5


@register
class SNR(Optimizer):
    family = "snr"
    variants = ("I", "II", "III")
    Options = SNROptions

    def __init__(self, model, loss_fn, lr, variant=None, **options):
        super().__init__(model, loss_fn, lr, variant, **options)
        alpha = self.opts.alpha
        self.alpha = DEFAULT_ALPHA[self.variant] if alpha is None else alpha

    def direction(self, batch) -> Direction:
        stats = batch_stats(self.model, self.loss_fn, batch, self.params, norms=False)
        tensors = [snr_scaled(self.variant, t, q, stats.n, self.alpha, self.opts.eps)
                   for t, q in zip(stats.sum, stats.sum_sq)]
        return Direction(tensors, stats.loss, grad_evals=stats.n)
