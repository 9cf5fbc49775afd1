"""K-FAC: factors against a float64 loop over examples and positions, the preconditioned
direction against a dense Kronecker solve, a convergence win over SGD, exact checkpoints and
a pure ``direction``."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from _loop import reloaded
from reference import batch_gradient, loss_fn
from torch import nn

from study.data import DataSplit
from study.grads.capture import capture
from study.optim import FAMILIES, Context
from study.optim.kfac.factors import covariance_a, covariance_g, sample_labels
from study.trial import scheduled_work


def conv_net(conv: nn.Module, length: int) -> nn.Sequential:
    """conv -> ReLU -> Flatten -> Linear(4), float64: two K-FAC layers of both kinds."""
    torch.manual_seed(0)
    body = nn.Sequential(conv, nn.ReLU(), nn.Flatten())
    shape = (2, length) if isinstance(conv, nn.Conv1d) else (2, length, length)
    features = body(torch.zeros(1, *shape)).shape[1]
    return nn.Sequential(conv, nn.ReLU(), nn.Flatten(), nn.Linear(features, 4)).double(), shape


NETS = {
    "conv2d": lambda: conv_net(nn.Conv2d(2, 3, 3, stride=2, padding=1), 5),
    "conv1d": lambda: conv_net(nn.Conv1d(2, 3, 3, stride=2, padding=1, dilation=2), 9),
    "linear": lambda: (nn.Sequential(nn.Flatten(), nn.Linear(6, 5), nn.Tanh(),
                                     nn.Linear(5, 4)).double(), (6,)),
}


def naive_patches(conv: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(T, d_in) receptive fields of one example by explicit loops (Conv1d as height 1)."""
    two_d = isinstance(conv, nn.Conv2d)
    x = x if two_d else x.unsqueeze(1)
    kh, kw = conv.kernel_size if two_d else (1, conv.kernel_size[0])
    sh, sw = conv.stride if two_d else (1, conv.stride[0])
    ph, pw = conv.padding if two_d else (0, conv.padding[0])
    dh, dw = conv.dilation if two_d else (1, conv.dilation[0])
    xp = F.pad(x, (pw, pw, ph, ph))
    rows = []
    for top in range(0, xp.shape[1] - dh * (kh - 1), sh):
        for left in range(0, xp.shape[2] - dw * (kw - 1), sw):
            rows.append(xp[:, top:top + dh * (kh - 1) + 1:dh,
                           left:left + dw * (kw - 1) + 1:dw].reshape(-1))
    return torch.stack(rows)


def naive_factors(model: nn.Sequential, x: torch.Tensor, y: torch.Tensor):
    """Reference (A, G) per K-FAC layer: one example at a time, output gradients of the
    per-example loss, conv positions looped; the reference's T scaling applied."""
    layers = [m for m in model if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d))]
    a_sum = {m: 0 for m in layers}
    g_sum = {m: 0 for m in layers}
    positions = {}
    for xi, yi in zip(x, y):
        h, outs, ins = xi.unsqueeze(0), {}, {}
        for m in model:
            if m in a_sum:
                ins[m] = h[0]
                h = m(h)
                h.retain_grad()
                outs[m] = h
            else:
                h = m(h)
        F.cross_entropy(h, yi.view(1)).backward()
        for m in layers:
            if isinstance(m, nn.Linear):
                rows, grads = ins[m].view(1, -1), outs[m].grad.view(1, -1)
            else:
                rows = naive_patches(m, ins[m])
                grads = outs[m].grad[0].reshape(m.out_channels, -1).t()
            rows = torch.cat([rows, torch.ones(rows.shape[0], 1, dtype=rows.dtype)], 1)
            t = rows.shape[0]
            positions[m] = t
            a_sum[m] = a_sum[m] + sum(torch.outer(r, r) for r in rows) / t ** 2
            g_sum[m] = g_sum[m] + t * sum(torch.outer(g, g) for g in grads)
    n = len(y)
    return [(a_sum[m] / n, g_sum[m] / n) for m in layers]


@pytest.mark.parametrize("net", list(NETS))
def test_factors_match_loop_over_examples(net):
    model, shape = NETS[net]()
    x, y = torch.randn(7, *shape, dtype=torch.float64), torch.randint(0, 4, (7,))
    with capture(model) as rec:
        torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters()))
    for (a_ref, g_ref), r in zip(naive_factors(model, x, y), rec):
        torch.testing.assert_close(covariance_a(r.module, r.a), a_ref, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(covariance_g(r.module, r.g, len(y)), g_ref, rtol=1e-10,
                                   atol=1e-12)


def make_kfac(model, shape, n=64, batch_size=16, **options):
    torch.manual_seed(1)
    train = DataSplit(torch.randn(n, *shape, dtype=torch.float64), torch.randint(0, 4, (n,)))
    opt = FAMILIES["kfac"](model, loss_fn, lr=0.1, **options)
    ctx = Context(model, loss_fn, train, batch_size, 0, 0,
                  torch.Generator().manual_seed(5))
    return opt, train, ctx


@pytest.mark.parametrize("net", list(NETS))
def test_frequent_work_averages_true_fisher_factors(net):
    """update_factors draws its batch and labels with ctx.generator only; the running
    average starts from the identity: m = decay·I + (1−decay)·new."""
    model, shape = NETS[net]()
    opt, train, ctx = make_kfac(model, shape, stat_decay=0.25)
    replay = torch.Generator().set_state(ctx.generator.get_state())
    global_rng = torch.get_rng_state()
    assert opt.update_factors(ctx) == 16
    assert torch.equal(torch.get_rng_state(), global_rng)
    batch = train.batch(torch.randint(len(train), (16,), generator=replay))
    labels = sample_labels(model(batch.x), replay)
    for (a_ref, g_ref), a, g in zip(naive_factors(model, batch.x, labels),
                                    opt.a_factors, opt.g_factors):
        eye = torch.eye(a.shape[0], dtype=a.dtype)
        torch.testing.assert_close(a, 0.25 * eye + 0.75 * a_ref, rtol=1e-10, atol=1e-12)
        eye = torch.eye(g.shape[0], dtype=g.dtype)
        torch.testing.assert_close(g, 0.25 * eye + 0.75 * g_ref, rtol=1e-10, atol=1e-12)


def test_sampled_labels_follow_softmax():
    logits = torch.tensor([[0.0, 1.0, 2.0]]).expand(40000, 3)
    labels = sample_labels(logits, torch.Generator().manual_seed(0))
    freq = torch.bincount(labels, minlength=3).double() / len(labels)
    torch.testing.assert_close(freq, torch.softmax(logits[0].double(), 0), atol=0.01, rtol=0)


def position(opt, param) -> int:
    return next(i for i, p in enumerate(opt.params) if p is param)


def dense_natural_gradient(a_factor, g_factor, grad_matrix, damping):
    """(G⊗A + damping·I)^{-1} vec(M), row-major vec: G V A + damping·V = M."""
    kron = torch.kron(g_factor, a_factor) + damping * torch.eye(grad_matrix.numel(),
                                                                  dtype=torch.float64)
    return torch.linalg.solve(kron, grad_matrix.reshape(-1)).view_as(grad_matrix)


@pytest.mark.parametrize("net", list(NETS))
@pytest.mark.parametrize("kl_clip", [1e30, 1e-6])
def test_direction_is_dense_kronecker_solve(net, kl_clip):
    model, shape = NETS[net]()
    opt, train, ctx = make_kfac(model, shape, damping=0.03, kl_clip=kl_clip)
    for _ in range(3):                      # factors away from the identity start
        opt.update_factors(ctx)
    opt.update_inverses(ctx)
    batch = train.batch(torch.arange(16))
    grads = batch_gradient(model, batch.x, batch.y, opt.params)
    d = opt.direction(batch)
    expected, inner = [], 0.0
    for layer, a, g in zip(opt.layers, opt.a_factors, opt.g_factors):
        iw, ib = position(opt, layer.weight), position(opt, layer.bias)
        m = torch.cat([grads[iw].reshape(len(grads[ib]), -1), grads[ib].view(-1, 1)], 1)
        v = dense_natural_gradient(a, g, m, 0.03)
        inner += float((v * m).sum())
        expected.append((iw, ib, v))
    nu = min(1.0, math.sqrt(kl_clip / (inner * 0.1 ** 2)))
    assert nu < 1 if kl_clip < 1 else nu == 1
    for iw, ib, v in expected:
        got = torch.cat([d.tensors[iw].reshape(v.shape[0], -1), d.tensors[ib].view(-1, 1)], 1)
        torch.testing.assert_close(got, nu * v, rtol=1e-6, atol=1e-12)


def test_other_parameters_keep_the_plain_gradient():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(1, 4, 3), nn.GroupNorm(2, 4), nn.Flatten(),
                          nn.Linear(4 * 6, 4)).double()
    opt, train, ctx = make_kfac(model, (1, 8), kl_clip=1e30)
    batch = train.batch(torch.arange(16))
    plain = opt.direction(batch)
    assert not plain.extras["preconditioned"]       # no inverse yet: the plain gradient
    opt.update_factors(ctx)
    opt.update_inverses(ctx)
    d = opt.direction(batch)
    assert d.extras["preconditioned"]
    norm = [position(opt, p) for p in model[1].parameters()]
    for i in range(len(opt.params)):
        assert torch.equal(d.tensors[i], plain.tensors[i]) == (i in norm)


def run_steps(opt, train, batch_size, steps, gen, start=0, losses=None):
    """The trial loop's order: periodic work due at this iteration, then direction, step."""
    ctx = Context(opt.model, loss_fn, train, batch_size, 0, 0, gen)
    periodic = opt.periodic()
    for it in range(start, start + steps):
        scheduled_work(periodic, ctx, it)
        idx = torch.randperm(len(train), generator=gen)[:batch_size]
        d = opt.direction(train.batch(idx))
        if losses is not None:
            losses.append(d.loss)
        opt.step(d)


def steps_to_target(family, lr, train, target, max_steps, **options):
    torch.manual_seed(0)
    model = nn.Linear(train.x.shape[1], 5).double()
    opt = FAMILIES[family](model, loss_fn, lr, **options)
    gen = torch.Generator().manual_seed(0)
    ctx = Context(model, loss_fn, train, len(train), 0, 0, gen)
    periodic = opt.periodic()
    for it in range(max_steps):
        scheduled_work(periodic, ctx, it)
        full = train.batch(torch.arange(len(train)))
        d = opt.direction(full)
        if not math.isfinite(d.loss):
            return max_steps + 1
        if d.loss <= target:
            return it
        opt.step(d)
    return max_steps + 1


def test_kfac_reaches_target_in_fewer_steps_than_sgd():
    """Badly scaled softmax regression (feature scales 1 to 0.01), full batch, each family
    at its best lr from one grid whose ends neither uses."""
    torch.manual_seed(0)
    n, dim = 256, 12
    scales = torch.logspace(0, -2, dim, dtype=torch.float64)
    x = torch.randn(n, dim, dtype=torch.float64) * scales
    true_w = torch.randn(5, dim, dtype=torch.float64) * 3 / scales
    train = DataSplit(x, (x @ true_w.t()).argmax(1))
    target, max_steps, grid = 0.5, 300, [1.0, 3.0, 10.0, 30.0, 100.0]
    sgd = [steps_to_target("sgd", lr, train, target, max_steps) for lr in grid]
    kfac = [steps_to_target("kfac", lr, train, target, max_steps, t_cov=1, t_inv=5)
            for lr in grid]
    assert min(sgd) <= max_steps and sgd[-1] > min(sgd)       # SGD's best lr is in the grid
    assert min(kfac) < 0.6 * min(sgd), (kfac, sgd)


def test_checkpoint_round_trip_continues_bit_identically():
    """Save mid-training (weight decay still delayed: its switch-on is crossed after the
    resume), restore into a fresh model and optimizer, continue: torch.equal everywhere."""
    model, shape = NETS["conv2d"]()
    opt, train, _ = make_kfac(model, shape, t_cov=1, t_inv=5, weight_decay=1e-3)
    fresh_model = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(3)
    run_steps(opt, train, 16, 7, gen)
    saved = reloaded({"opt": opt.state_dict(), "model": model.state_dict(),
                      "gen": gen.get_state()})
    run_steps(opt, train, 16, 30, gen, start=7)          # uninterrupted
    fresh_model.load_state_dict(saved["model"])
    resumed = FAMILIES["kfac"](fresh_model, loss_fn, 0.1, t_cov=1, t_inv=5,
                               weight_decay=1e-3)
    resumed.load_state_dict(saved["opt"])
    run_steps(resumed, train, 16, 30, torch.Generator().set_state(saved["gen"]), start=7)
    assert resumed.steps == opt.steps == 37
    for p, q in zip(model.parameters(), fresh_model.parameters()):
        assert torch.equal(p, q)
    for a, b in zip(opt.a_factors + opt.g_factors, resumed.a_factors + resumed.g_factors):
        assert torch.equal(a, b)


def test_direction_is_pure():
    model, shape = NETS["conv2d"]()
    opt, train, _ = make_kfac(model, shape, kl_clip=1e-4)
    run_steps(opt, train, 16, 12, torch.Generator().manual_seed(0))
    before = opt.state_dict()
    params = [p.detach().clone() for p in model.parameters()]
    rng = torch.get_rng_state()
    batch = train.batch(torch.arange(16))
    first = opt.direction(batch)
    assert first.extras["nu"] < 1                       # the clip is exercised too
    for _ in range(3):
        again = opt.direction(batch)
        assert all(torch.equal(a, b) for a, b in zip(first.tensors, again.tensors))
    after = opt.state_dict()
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params))
    assert before["steps"] == after["steps"] and before["factor_updates"] == after[
        "factor_updates"] and before["inverse_updates"] == after["inverse_updates"]
    for key in ("a_factors", "g_factors"):
        assert all(torch.equal(a, b) for a, b in zip(before[key], after[key]))
    for b0, b1 in zip(before["bases"], after["bases"]):
        assert all(torch.equal(b0[k], b1[k]) for k in b0)
    for b0, b1 in zip(before["rule"]["buffers"], after["rule"]["buffers"]):
        assert torch.equal(b0, b1)


def test_weight_decay_starts_after_twenty_factor_periods():
    """The reference adds weight decay only once steps >= 20·t_cov."""
    runs = {}
    for wd in (0.0, 0.5):
        torch.manual_seed(0)
        model, shape = NETS["linear"]()
        opt, train, _ = make_kfac(model, shape, t_cov=1, t_inv=1, weight_decay=wd)
        history = []
        gen = torch.Generator().manual_seed(0)
        for start in range(21):
            run_steps(opt, train, 16, 1, gen, start=start)
            history.append([p.detach().clone() for p in model.parameters()])
        runs[wd] = history
    for step in range(20):
        assert all(torch.equal(a, b) for a, b in zip(runs[0.0][step], runs[0.5][step]))
    assert not all(torch.equal(a, b) for a, b in zip(runs[0.0][20], runs[0.5][20]))


@pytest.mark.parametrize("option,value", [("damping", 0.0), ("stat_decay", 1.0),
                                          ("t_cov", 0), ("t_inv", 2.5), ("kl_clip", -1.0)])
def test_bad_options_name_the_field(option, value):
    with pytest.raises(ValueError, match=option):
        FAMILIES["kfac"](nn.Linear(2, 2), loss_fn, 0.1, **{option: value})


def test_family_registers_once_from_its_package():
    from study.optim.kfac import KFAC
    assert FAMILIES["kfac"] is KFAC and KFAC.__module__ == "study.optim.kfac.family"
