"""SNR-gradient directions against a float64 loop over examples (against sngrad's own loss
and formulas: test_snr_sngrad.py)."""
from __future__ import annotations

import pytest
import torch
from reference import loss_fn, per_example_grads

from study.data import Batch
from study.models import MLP, CNN1d
from study.optim import make_optimizer


def reference(variant, g, alpha, eps):
    mu, sigma = g.mean(0), g.std(0, unbiased=False)
    if variant == "I":
        return mu * torch.minimum(1 / (alpha * sigma + eps), torch.ones_like(mu))
    if variant == "II":
        return mu * torch.minimum(mu ** 2 / (alpha * sigma ** 2 + eps), torch.ones_like(mu))
    return mu * (1 - torch.minimum(alpha * sigma, torch.ones_like(mu)))


@pytest.mark.parametrize("variant, alpha, default", [("I", None, 1.0), ("II", None, 0.05),
                                                     ("III", None, 1.0), ("I", 3.0, 3.0),
                                                     ("III", 20.0, 20.0)])
@pytest.mark.parametrize("make, shape", [(lambda: MLP(8, [6], 3), (10, 8)),
                                         (lambda: CNN1d(1, 16, [3, 3, 3], 3), (10, 1, 16))])
@pytest.mark.parametrize("loss_scale, scale", [(1.0, 1.0), (None, 1 / 3)])
def test_direction_matches_loop(variant, alpha, default, make, shape, loss_scale, scale):
    """The statistics are those of the per-example gradients of CE × loss_scale (None: 1/C,
    here C = 3) and the direction is divided by loss_scale; 1.0 is α, ε on CE itself."""
    torch.manual_seed(1)
    model = make().double()
    x, y = torch.randn(*shape, dtype=torch.float64) * 3, torch.randint(0, 3, (shape[0],))
    opt = make_optimizer("snr", model, loss_fn, lr=0.1, variant=variant, alpha=alpha,
                         loss_scale=loss_scale)
    assert opt.alpha == default
    d = opt.direction(Batch(x, y, torch.arange(len(y))))
    assert d.grad_evals == len(y)
    expected = [reference(variant, g * scale, default, 1e-5) / scale
                for g in per_example_grads(model, x, y)]
    scaled = 0
    for got, want in zip(d.tensors, expected):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
        scaled += int((got != 0).sum())
    assert scaled > 0
    assert all(p.grad is None for p in model.parameters())


def test_directions_differ_from_plain_mean():
    """The scaling must bite: with noisy examples some entries are damped."""
    torch.manual_seed(2)
    model = MLP(8, [6], 3).double()
    x, y = torch.randn(10, 8, dtype=torch.float64) * 3, torch.randint(0, 3, (10,))
    opt = make_optimizer("snr", model, loss_fn, lr=0.1, variant="I", alpha=5.0)
    d = opt.direction(Batch(x, y, torch.arange(10)))
    mean = [g.mean(0) for g in per_example_grads(model, x, y)]
    assert any(not torch.allclose(a, b) for a, b in zip(d.tensors, mean))


def test_step_applies_lr_times_direction():
    torch.manual_seed(3)
    model = MLP(8, [6], 3).double()
    x, y = torch.randn(10, 8, dtype=torch.float64), torch.randint(0, 3, (10,))
    opt = make_optimizer("snr", model, loss_fn, lr=0.5, variant="II")
    before = [p.detach().clone() for p in model.parameters()]
    d = opt.direction(Batch(x, y, torch.arange(10)))
    opt.step(d)
    for p, b, t in zip(model.parameters(), before, d.tensors):
        torch.testing.assert_close(p.detach(), b - 0.5 * t)


@pytest.mark.parametrize("bad, field", [({"alpha": 0.0}, "alpha"), ({"alpha": -1}, "alpha"),
                                        ({"alpha": "x"}, "alpha"), ({"eps": -1.0}, "eps"),
                                        ({"loss_scale": 0.0}, "loss_scale"),
                                        ({"loss_scale": -0.1}, "loss_scale"),
                                        ({"loss_scale": "1/C"}, "loss_scale")])
def test_bad_options_name_the_field(bad, field):
    with pytest.raises(ValueError, match=f"snr.options.{field}"):
        make_optimizer("snr", MLP(4, [3], 2), loss_fn, lr=0.1, variant="I", **bad)


@pytest.mark.parametrize("alpha", [1e-9, 30.0, 1e9])
def test_frac_damped_counts_the_entries_the_noise_damped(alpha):
    """SNR-I with loss_scale 1: an entry is damped exactly where α·σ + ε > 1, counted from the
    float64 per-example loop; α = 1e-9 damps nothing (the step is SGD's), α = 1e9 every entry
    with σ > 1e-9."""
    torch.manual_seed(0)
    model = MLP(8, [6], 3).double()
    x, y = torch.randn(10, 8, dtype=torch.float64), torch.randint(0, 3, (10,))
    batch = Batch(x, y, torch.arange(10))
    opt = make_optimizer("snr", model, loss_fn, 0.1, "I", alpha=alpha, loss_scale=1.0)
    d = opt.direction(batch)
    opt.step(d)
    g = torch.cat([t.reshape(10, -1) for t in per_example_grads(model, x, y)], dim=1)
    expected = float((alpha * g.std(0, unbiased=False) + 1e-5 > 1).double().mean())
    assert opt.metrics()["snr/frac_damped"] == pytest.approx(expected, abs=1e-12)
    if alpha == 1e-9:
        assert expected == 0.0
    else:
        assert expected > 0.0
