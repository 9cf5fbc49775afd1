"""SVRG: the control-variate direction against float64 per-example references."""
from __future__ import annotations

import copy

import pytest
import torch
from _loop import checkpoint, make_context, restore, run_epochs, trial_resumes_exactly
from reference import full_gradient, loss_fn

from study.data import DataSplit, UniformSampler
from study.models import MLP
from study.optim import make_optimizer
from study.optim.svrg import ONLY_AT_START


def problem(n=24, d=5, classes=3, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=dtype)
    y = torch.randint(0, classes, (n,), generator=g)
    torch.manual_seed(seed)
    model = MLP(d, [7], classes).to(dtype)
    return model, DataSplit(x, y)


def perturb(model, scale=0.3, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))


def test_direction_at_snapshot_is_the_full_gradient():
    model, train = problem()
    opt = make_optimizer("svrg", model, loss_fn, lr=0.1)
    ctx = make_context(opt, train, batch_size=4)
    assert opt.take_snapshot(ctx) == len(train)
    expected = full_gradient(model, train)
    d = opt.direction(train.batch(torch.tensor([3, 7, 11, 0])))
    assert d.grad_evals == 8
    for a, b in zip(d.tensors, expected):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_direction_is_unbiased_over_an_epoch_partition():
    model, train = problem()
    opt = make_optimizer("svrg", model, loss_fn, lr=0.1)
    opt.take_snapshot(make_context(opt, train, batch_size=6))
    perturb(model)  # w != w_snap: the control variate no longer cancels per batch
    expected = full_gradient(model, train)
    batches = list(UniformSampler(len(train), 6, torch.Generator().manual_seed(3)))
    assert sum(len(b) for b in batches) == len(train)
    dirs = [opt.direction(train.batch(idx)).tensors for idx in batches]
    mean = [torch.stack(ts).mean(0) for ts in zip(*dirs)]
    for a, b in zip(mean, expected):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    # ...while single batches differ from it (the test above would pass trivially otherwise)
    assert max((d[0] - expected[0]).abs().max() for d in dirs) > 1e-4


def test_direction_is_pure():
    model, train = problem()
    opt = make_optimizer("svrg", model, loss_fn, lr=0.1, momentum=0.9)
    ctx = make_context(opt, train, batch_size=4)
    run_epochs(opt, ctx, epochs=1)
    before = copy.deepcopy(opt.state_dict()), copy.deepcopy(model.state_dict())
    batch = train.batch(torch.arange(4))
    d1, d2 = opt.direction(batch), opt.direction(batch)
    for a, b in zip(d1.tensors, d2.tensors):
        assert torch.equal(a, b)
    after = opt.state_dict(), model.state_dict()
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(before[1][k], after[1][k]) for k in after[1])
    for k, t in before[0]["snapshot"]["params"].items():
        assert torch.equal(t, after[0]["snapshot"]["params"][k])
        assert after[0]["snapshot"]["params"][k].grad is None


@pytest.mark.parametrize("unit,every", [("epoch", 1), ("iter", 5)])
def test_schedule_takes_a_snapshot_before_the_first_step(unit, every):
    model, train = problem()
    opt = make_optimizer("svrg", model, loss_fn, lr=0.1, snapshot_unit=unit,
                         snapshot_every=every)
    with pytest.raises(RuntimeError, match="before the first snapshot"):
        opt.direction(train.batch(torch.arange(4)))
    iter_periodics = [p for p in opt.periodic() if p.unit == "iter"]
    assert iter_periodics and all(p.due("iter", 0) for p in iter_periodics)
    ctx = make_context(opt, train, batch_size=4)
    cost = run_epochs(opt, ctx, epochs=2)  # 6 steps per epoch
    snapshots = {"epoch": 1 + 2, "iter": 3}[unit]  # epoch: start + end of each epoch
    assert cost == 12 * 2 * 4 + snapshots * len(train)


def test_bootstrap_is_free_when_a_snapshot_exists():
    model, train = problem()
    opt = make_optimizer("svrg", model, loss_fn, lr=0.1)
    ctx = make_context(opt, train, batch_size=4)
    (boot,) = [p for p in opt.periodic() if p.unit == "iter"]
    assert boot.every == ONLY_AT_START and not boot.due("iter", 12)
    assert boot.run(ctx) == len(train) and boot.run(ctx) == 0


def test_state_dict_round_trip_continues_bit_identically():
    def fresh():
        model, train = problem(n=30, dtype=torch.float32)
        opt = make_optimizer("svrg", model, loss_fn, lr=0.05, momentum=0.9,
                             snapshot_unit="iter", snapshot_every=4)
        return model, opt, make_context(opt, train, batch_size=4)

    model, opt, ctx = fresh()
    run_epochs(opt, ctx, epochs=1)  # 7 steps: the snapshot from iteration 4 is live
    saved = checkpoint(opt, ctx)
    run_epochs(opt, ctx, epochs=2)
    reference = [p.detach().clone() for p in model.parameters()]

    model2, opt2, ctx2 = fresh()
    perturb(model2)  # make sure loading really overwrites everything
    restore(opt2, ctx2, saved)
    run_epochs(opt2, ctx2, epochs=2)
    for a, b in zip(reference, model2.parameters()):
        assert torch.equal(a, b)


def test_bad_options_name_the_field():
    model, _ = problem()
    with pytest.raises(ValueError, match="snapshot_unit"):
        make_optimizer("svrg", model, loss_fn, lr=0.1, snapshot_unit="weeks")
    with pytest.raises(ValueError, match="snapshot_every"):
        make_optimizer("svrg", model, loss_fn, lr=0.1, snapshot_every=0)


def test_trial_with_svrg_resumes_exactly(tmp_path):
    metrics, n = trial_resumes_exactly(tmp_path, "svrg", "svrg",
                                       {"momentum": 0.5, "snapshot_unit": "iter",
                                        "snapshot_every": 7})
    steps = 4 * (n // 32)            # 4 epochs at batch 32, 2·32 evaluations per step
    snapshots = len(range(0, steps, 7))
    assert metrics["grad_evals"] == steps * 64 + snapshots * n
