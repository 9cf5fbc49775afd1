"""SNR directions against sngrad itself (kaifishr/SignalNoiseGradients, ``model.py``): its
formulas, as its code writes them, on the per-example gradients of its own loss
``-mean(log_softmax(logits) * one_hot)`` over the C classes, by a float64 loop over examples.

Our direction is in the units of our loss (cross-entropy), so ``direction × loss_scale`` is
sngrad's direction; the default ``loss_scale`` (None) is 1/C, read from the logits."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from reference import loss_fn, per_example_grads

from study.data import Batch
from study.models import MLP, CNN1d
from study.optim import make_optimizer

SNGRAD_ALPHA = {"I": 1.0, "II": 0.05, "III": 1.0}   # sngrad's defaults; ε = 1e-5


def sngrad_loss(logits, y):
    """sngrad's ``_loss`` for one example: ``-jnp.mean(preds * targets)`` with preds the
    log-softmax and targets one-hot, the mean over the C classes (not our cross-entropy)."""
    preds = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    return -(preds * F.one_hot(y, logits.shape[1]).to(preds.dtype)).mean(dim=1)


def sngrad_direction(variant, dx, alpha, eps):
    """sngrad's adjustment of one parameter's (B, *shape) per-example gradients, written as
    its code is: ``jnp.mean``/``jnp.std``/``jnp.var`` over axis 0 (population, ddof=0)."""
    dx_mean = dx.mean(0)
    dx_std = dx.std(0, unbiased=False)
    dx_var = dx.var(0, unbiased=False)
    one = torch.ones_like(dx_mean)
    if variant == "I":
        return dx_mean * torch.minimum(1.0 / (alpha * dx_std + eps), one)
    if variant == "II":
        return dx_mean * torch.minimum(dx_mean ** 2 / (alpha * dx_var + eps), one)
    return (1.0 - torch.clamp(alpha * dx_std, max=1.0)) * dx_mean


def branches(variant, dx, alpha, eps):
    """(entries where the min picks its first argument, entries where it picks 1)."""
    dx_mean, dx_std = dx.mean(0), dx.std(0, unbiased=False)
    if variant == "I":
        first = 1.0 / (alpha * dx_std + eps)
    elif variant == "II":
        first = dx_mean ** 2 / (alpha * dx_std ** 2 + eps)
    else:
        first = alpha * dx_std
    return int((first < 1).sum()), int((first > 1).sum())


def spread_problem(classes, seed=0):
    """An MLP on inputs whose features range over five decades: per-entry σ of the weight
    gradients goes from ~1e-4 to ~1e1 in sngrad's units, so every min sees both sides."""
    torch.manual_seed(seed)
    model = MLP(8, [6], classes).double()
    scales = torch.logspace(-3, 2, 8, dtype=torch.float64)
    x = (torch.randn(16, 8, dtype=torch.float64) + 1.0) * scales
    y = torch.randint(0, classes, (16,))
    return model, x, y


CASES = [("I", None, 1e-5), ("II", None, 1e-5), ("III", None, 1e-5),
         ("I", 0.3, 1e-3), ("II", 0.5, 1e-3), ("III", 0.3, 1e-3),
         ("I", 4.0, 0.1), ("II", 0.01, 0.1), ("III", 4.0, 0.1)]


@pytest.mark.parametrize("classes", [10, 4])
@pytest.mark.parametrize("variant, alpha, eps", CASES)
def test_default_reproduces_sngrad(variant, alpha, eps, classes):
    """The defaults (loss_scale None = 1/C, C from the logits) give sngrad's direction, in
    our loss's units: ours × 1/C equals sngrad's to 1e-12, on both sides of each min."""
    model, x, y = spread_problem(classes)
    options = {"eps": eps} if alpha is None else {"alpha": alpha, "eps": eps}
    opt = make_optimizer("snr", model, loss_fn, lr=0.1, variant=variant, **options)
    a = SNGRAD_ALPHA[variant] if alpha is None else alpha
    assert opt.alpha == a
    d = opt.direction(Batch(x, y, torch.arange(len(y))))
    truth = per_example_grads(model, x, y, loss=sngrad_loss)
    first = second = 0
    for got, dx in zip(d.tensors, truth):
        torch.testing.assert_close(got / classes, sngrad_direction(variant, dx, a, eps),
                                   rtol=1e-12, atol=1e-12)
        f, s = branches(variant, dx, a, eps)
        first, second = first + f, second + s
    assert first > 0 and second > 0, (first, second)
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("variant", ["I", "II", "III"])
@pytest.mark.parametrize("scale", [0.25, 1.0, 3.0])
def test_explicit_loss_scale(variant, scale):
    """loss_scale = s: sngrad's formulas on the per-example gradients of CE × s, divided by s
    (s = 1.0 is the behaviour before the option: α and ε on our cross-entropy)."""
    model, x, y = spread_problem(3, seed=1)
    opt = make_optimizer("snr", model, loss_fn, lr=0.1, variant=variant, loss_scale=scale)
    d = opt.direction(Batch(x, y, torch.arange(len(y))))
    truth = per_example_grads(model, x, y, loss=lambda z, t: loss_fn(z, t) * scale)
    for got, dx in zip(d.tensors, truth):
        want = sngrad_direction(variant, dx, SNGRAD_ALPHA[variant], 1e-5)
        torch.testing.assert_close(got * scale, want, rtol=1e-12, atol=1e-12)


def test_loss_scale_none_reads_classes_from_the_logits():
    """C comes from dimension 1 of the logits, for a CNN too; loss_scale=1/C is the same."""
    torch.manual_seed(4)
    model = CNN1d(1, 16, [3, 3, 3], 5).double()
    x, y = torch.randn(10, 1, 16, dtype=torch.float64) * 3, torch.randint(0, 5, (10,))
    batch = Batch(x, y, torch.arange(10))
    default = make_optimizer("snr", model, loss_fn, lr=0.1, variant="I").direction(batch)
    explicit = make_optimizer("snr", model, loss_fn, lr=0.1, variant="I",
                              loss_scale=0.2).direction(batch)
    truth = per_example_grads(model, x, y, loss=sngrad_loss)
    for a, b, dx in zip(default.tensors, explicit.tensors, truth):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=0)
        torch.testing.assert_close(a / 5, sngrad_direction("I", dx, 1.0, 1e-5),
                                   rtol=1e-12, atol=1e-12)


def test_lr_is_sngrad_lr_over_classes():
    """One step at lr = lr_sngrad / C moves the weights as sngrad's update
    ``w - lr_sngrad * _sng(dw)`` does."""
    model, x, y = spread_problem(10, seed=2)
    lr_sngrad = 1.0
    truth = per_example_grads(model, x, y, loss=sngrad_loss)
    expected = [p.detach() - lr_sngrad * sngrad_direction("I", dx, 1.0, 1e-5)
                for p, dx in zip(model.parameters(), truth)]
    opt = make_optimizer("snr", model, loss_fn, lr=lr_sngrad / 10, variant="I")
    opt.step(opt.direction(Batch(x, y, torch.arange(len(y)))))
    for p, want in zip(model.parameters(), expected):
        torch.testing.assert_close(p.detach(), want, rtol=1e-12, atol=1e-12)


def test_loss_scale_none_needs_class_logits():
    model = torch.nn.Sequential(torch.nn.Linear(4, 1), torch.nn.Flatten(0)).double()
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    mse = lambda z, t: (z - t) ** 2  # noqa: E731
    batch = Batch(x, y, torch.arange(6))
    with pytest.raises(ValueError, match="loss_scale"):
        make_optimizer("snr", model, mse, lr=0.1, variant="I").direction(batch)
    d = make_optimizer("snr", model, mse, lr=0.1, variant="I", loss_scale=1.0).direction(batch)
    assert all(torch.isfinite(t).all() for t in d.tensors)
