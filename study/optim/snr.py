"""Signal-to-noise gradients (kaifishr/SignalNoiseGradients, "sngrad", ``model.py``).

From the per-example gradients of the mini-batch (population statistics, ddof=0, as
``jnp.std``/``jnp.var``), each parameter entry has a mean μ and a standard deviation σ; the
step direction damps entries whose mean is small relative to their spread:

- I:   μ·min(1/(α·σ + ε), 1)        (α = 1.0; the variant sngrad actually uses)
- II:  μ·min(μ²/(α·σ² + ε), 1)      (α = 0.05)
- III: μ·(1 − min(α·σ, 1))          (α = 1.0)

Units. These formulas are not invariant to the scale of the loss, and sngrad's loss is not
ours: it is ``-mean(log_softmax(logits) * one_hot)`` over the C classes, i.e. CE/C, while we
train on the cross-entropy CE. So μ and σ above are those of the per-example gradients of
``loss × loss_scale`` (option ``loss_scale``; None = 1/C with C read from the logits, which
reproduces sngrad), with α and ε keeping sngrad's defaults and meaning. The direction is
then divided by ``loss_scale``, i.e. returned in the units of our loss, so the update rule
and the learning rate keep their meaning: sngrad's step ``lr_s · d_s`` equals our
``lr · (d_s / loss_scale)`` with ``lr = lr_s · loss_scale`` (= lr_s / C by default: sngrad's
0.5-2.0 is 0.05-0.2 here for C = 10). Where the noise is small the factors are 1 and the
direction is the plain mini-batch gradient of our loss, as SGD's.

Written with μ, σ of our loss and s = loss_scale (μ_s = s·μ, σ_s = s·σ), the direction is
the same formula with α, ε moved (this is how it is computed: no extra passes):

- I:   μ·min(1/(α·s·σ + ε), 1)      (α → α·s; ε unchanged)
- II:  μ·min(μ²/(α·σ² + ε/s²), 1)   (α unchanged; ε → ε/s²)
- III: μ·(1 − min(α·s·σ, 1))        (α → α·s)

``loss_scale = 1.0`` applies α and ε to our loss directly (the behaviour before the option).

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
               alpha: float, eps: float, scale: float = 1.0) -> torch.Tensor:
    """The noise-scaled mean of one parameter from Σg and Σg² over n examples of our loss,
    with the statistics taken of the loss × ``scale`` and the result divided by ``scale``
    (formulas in the module docstring; in-place on fresh temporaries: these passes over
    every parameter are memory-bound and cost as much as a matmul for wide layers)."""
    mean = total / n
    var = (total_sq / n).addcmul_(mean, mean, value=-1).clamp_(min=0)
    if variant == "I":
        return mean.mul_(var.sqrt_().mul_(alpha * scale).add_(eps).reciprocal_()
                         .clamp_(max=1.0))
    if variant == "II":
        return mean.mul_((mean * mean).div_(var.mul_(alpha).add_(eps / scale ** 2))
                         .clamp_(max=1.0))
    if variant == "III":
        return mean.mul_(var.sqrt_().mul_(alpha * scale).clamp_(max=1.0).neg_().add_(1.0))
    raise ValueError(f"snr: unknown variant {variant!r}")


def classes_of(logits: torch.Tensor) -> int:
    """C, the number of classes: dimension 1 of the logits (``F.cross_entropy``'s)."""
    if logits.dim() < 2:
        raise ValueError(f"snr: loss_scale=None reads the number of classes from dimension 1 "
                         f"of the logits, which have shape {tuple(logits.shape)}; set "
                         f"options.loss_scale")
    return logits.shape[1]


class SNROptions(StepOptions):
    alpha: Positive | None = None     # None: the variant's default (DEFAULT_ALPHA), sngrad's
    eps: NonNegative = 1e-5           # sngrad's; α and ε act on the statistics of loss×scale
    # μ, σ are those of loss × loss_scale and the direction is divided by it (our loss's
    # units; lr = lr_sngrad × loss_scale). None: 1/C (C from the logits), sngrad's
    # one-hot-mean loss CE/C; 1.0: α and ε applied to our loss directly.
    loss_scale: Positive | None = None


@register
class SNR(Optimizer):
    family = "snr"
    variants = ("I", "II", "III")
    Options = SNROptions

    def __init__(self, model, loss_fn, lr, variant=None, **options):
        super().__init__(model, loss_fn, lr, variant, **options)
        alpha = self.opts.alpha
        self.alpha = DEFAULT_ALPHA[self.variant] if alpha is None else alpha
        self.frac_damped: float | None = None

    def direction(self, batch) -> Direction:
        classes: list[int] = []

        def loss_fn(logits, y):
            if self.opts.loss_scale is None:
                classes.append(classes_of(logits))
            return self.loss_fn(logits, y)

        stats = batch_stats(self.model, loss_fn, batch, self.params, norms=False)
        scale = self.opts.loss_scale if self.opts.loss_scale is not None else 1.0 / classes[0]
        tensors = [snr_scaled(self.variant, t, q, stats.n, self.alpha, self.opts.eps, scale)
                   for t, q in zip(stats.sum, stats.sum_sq)]
        # entries the noise damped (|scaled| < |mean|): how much SNR departs from SGD here
        damped = sum(int((d.abs() < (t / stats.n).abs()).sum()) for d, t in zip(tensors,
                                                                                stats.sum))
        return Direction(tensors, stats.loss, grad_evals=stats.n,
                         extras={"frac_damped": damped / sum(t.numel() for t in tensors)})

    def step(self, direction: Direction) -> None:
        super().step(direction)
        self.frac_damped = direction.extras.get("frac_damped")

    def metrics(self) -> dict[str, float]:
        """Fraction of entries the last step damped (0: this step was plain SGD's)."""
        return {} if self.frac_damped is None else {"snr/frac_damped": self.frac_damped}

    def state_dict(self) -> dict:
        return {**super().state_dict(), "frac_damped": self.frac_damped}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.frac_damped = state.get("frac_damped")
