"""Well-tempered backprop against a float64 loop over mini-batches."""
from __future__ import annotations

import copy

import pytest
import torch
from _loop import make_context
from reference import batch_gradient, loss_fn

from study.data import DataSplit
from study.models import MLP
from study.optim import make_optimizer


def setup(seed=0, n=48):
    torch.manual_seed(seed)
    model = MLP(6, [5], 3).double()
    x = torch.randn(n, 6, dtype=torch.float64) * 2
    y = torch.randint(0, 3, (n,))
    return model, DataSplit(x, y)


def ref_snr(grads):
    """grads: list over mini-batches of lists over parameters -> snr per parameter."""
    out = []
    for per in zip(*grads):
        g = torch.stack(per)
        m1, m2 = g.mean(0), (g * g).mean(0)
        err = ((m2 - m1 ** 2) / len(per)).sqrt()
        err[err == 0] = 1e-8
        out.append(m1.abs() / err)
    return out


def batches(split, size):
    return [split.batch(torch.arange(i, i + size)) for i in range(0, len(split), size)]


def run_epoch(opt, split, size):
    used = []
    for b in batches(split, size):
        used.append(batch_gradient(opt.model, b.x, b.y))
        d = opt.direction(b)
        opt.step(d)
    return used


def test_epoch_variant_first_epoch_unscaled_then_snr_damps():
    model, split = setup()
    opt = make_optimizer("well_tempered", model, loss_fn, lr=0.05, variant="epoch")
    b0 = split.batch(torch.arange(8))
    for got, want in zip(opt.direction(b0).tensors, batch_gradient(model, b0.x, b0.y)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    used = run_epoch(opt, split, 8)
    [work] = opt.periodic()
    assert (work.size, work.every, work.unit) == ("dataset", 1, "epoch")
    assert work.run(make_context(opt, split, 8)) == 0
    snr = ref_snr(used)
    for got, want in zip(opt.snr, snr):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=0)
    assert opt.count == 0 and opt.total is None
    fractions = [float((s < 1).double().mean()) for s in snr]
    assert 0 < sum(fractions)  # some entries are damped in this noisy setup
    metrics = opt.metrics()
    for (name, _), f in zip(model.named_parameters(), fractions):
        assert metrics[f"wt/frac_scaled/{name}"] == pytest.approx(f)
    sizes = [p.numel() for p in model.parameters()]
    assert metrics["wt/frac_scaled"] == pytest.approx(
        sum(f * s for f, s in zip(fractions, sizes)) / sum(sizes))
    # next epoch: scaled where snr < 1, unchanged elsewhere; direction is pure
    b = split.batch(torch.arange(8, 16))
    d = opt.direction(b)
    assert opt.count == 0
    for got, raw, g, s in zip(d.tensors, d.extras["raw"], batch_gradient(model, b.x, b.y), snr):
        torch.testing.assert_close(got, torch.where(s < 1, s * g, g), rtol=1e-9, atol=1e-15)
        torch.testing.assert_close(raw, g, rtol=1e-12, atol=0)


def test_epoch_variant_accumulates_raw_gradients_not_scaled_ones():
    model, split = setup(1)
    opt = make_optimizer("well_tempered", model, loss_fn, lr=0.05, variant="epoch")
    run_epoch(opt, split, 8)
    opt.periodic()[0].run(make_context(opt, split, 8))
    used = run_epoch(opt, split, 8)
    opt.periodic()[0].run(make_context(opt, split, 8))
    for got, want in zip(opt.snr, ref_snr(used)):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=0)


def test_accumulate_variant_updates_every_n_steps():
    model, split = setup(2)
    opt = make_optimizer("well_tempered", model, loss_fn, lr=0.3, variant="accumulate", n=3)
    assert opt.periodic() == []
    start = [p.detach().clone() for p in model.parameters()]
    used = []
    for i, b in enumerate(batches(split, 8)[:3]):
        used.append(batch_gradient(model, b.x, b.y))
        d = opt.direction(b)
        for got, want in zip(d.tensors, used[-1]):  # the direction is the mini-batch gradient
            torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
        opt.step(d)
        if i < 2:
            assert all(torch.equal(p, s) for p, s in zip(model.parameters(), start))
    snr = ref_snr(used)
    for p, s0, per, s in zip(model.parameters(), start, zip(*used), snr):
        mean = torch.stack(per).mean(0)
        expected = torch.where(s > 1, mean, s * mean)
        torch.testing.assert_close(p.detach(), s0 - 0.3 * expected, rtol=1e-9, atol=1e-15)
    assert opt.count == 0
    fractions = [float((s < 1).double().mean()) for s in snr]
    names = [n for n, _ in model.named_parameters()]
    assert [opt.metrics()[f"wt/frac_scaled/{n}"] for n in names] == pytest.approx(fractions)


@pytest.mark.parametrize("variant", ["epoch", "accumulate"])
def test_state_dict_round_trip_continues_bit_identically(variant):
    model, split = setup(3)
    opt = make_optimizer("well_tempered", model, loss_fn, lr=0.1, variant=variant, n=4,
                         momentum=0.9)
    bs = batches(split, 8)

    def train(opt, steps):
        for b in steps:
            opt.step(opt.direction(b))
            if variant == "epoch" and b is bs[-1]:
                opt.periodic()[0].run(make_context(opt, split, 8))

    train(opt, bs + bs[:3])       # one epoch (snr formed) plus a partial window
    saved_model = copy.deepcopy(model.state_dict())
    saved_opt = copy.deepcopy(opt.state_dict())
    train(opt, bs[3:] + bs)
    model2, _ = setup(3)
    model2.load_state_dict(saved_model)
    opt2 = make_optimizer("well_tempered", model2, loss_fn, lr=0.1, variant=variant, n=4,
                          momentum=0.9)
    opt2.load_state_dict(saved_opt)
    train(opt2, bs[3:] + bs)
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)
    assert opt.count == opt2.count
    if variant == "epoch":
        assert all(torch.equal(a, b) for a, b in zip(opt.snr, opt2.snr))


@pytest.mark.parametrize("n", [1, 2.5, "3", True])
def test_bad_n_names_the_field(n):
    model, _ = setup()
    with pytest.raises(ValueError, match="well_tempered.options.n"):
        make_optimizer("well_tempered", model, loss_fn, lr=0.1, variant="accumulate", n=n)
