"""batch_stats against a float64 loop over examples (one autograd call per example)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from reference import loss_fn, per_example_grads, per_example_losses
from torch import nn

from study.data import Batch
from study.grads import BatchStats, batch_stats
from study.grads.conv import conv_plan, conv_stats
from study.grads.fallback import fallback_stats
from study.grads.norm import groupnorm_stats, saved_statistics
from study.models import MLP, CNN1d, LeNet, ResNet, ResNet8

TOL = 1e-6


def rel(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def assert_matches(stats: BatchStats, per, loss, params):
    assert stats.n == per[0].shape[0]
    assert stats.loss == pytest.approx(loss, rel=1e-9)
    for s, q, g, p in zip(stats.sum, stats.sum_sq, per, params):
        assert s.shape == p.shape and q.shape == p.shape
        assert rel(s, g.sum(0)) < TOL
        assert rel(q, (g * g).sum(0)) < TOL
    norms = sum((g.reshape(g.shape[0], -1) ** 2).sum(1) for g in per)
    assert rel(stats.norms_sq, norms) < TOL
    for m, v, g in zip(stats.mean(), stats.var(), per):
        assert rel(m, g.mean(0)) < TOL
        ref_var = g.var(0, unbiased=False)
        assert float((v - ref_var).abs().max()) <= TOL * float(ref_var.abs().max() + 1e-30)


def check(model, x, y, loss=loss_fn, params=None, reduction="none"):
    model = model.double()
    x = x.double()
    params = params or [p for p in model.parameters() if p.requires_grad]
    per = per_example_grads(model, x, y, params, loss_fn)
    ref_loss = float(per_example_losses(model, x, y, loss_fn).mean())
    stats = batch_stats(model, loss, Batch(x, y, torch.arange(len(y))), params,
                        reduction=reduction)
    assert_matches(stats, per, ref_loss, params)
    for p in params:
        assert p.grad is None
    return stats


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)


class Seq(nn.Module):
    """(B, T, d) -> Linear over positions -> mean over positions -> classes."""

    def __init__(self, d=5, h=7, c=3, bias=True):
        super().__init__()
        self.lin = nn.Linear(d, h, bias=bias)
        self.out = nn.Linear(h, c)

    def forward(self, x):
        return self.out(torch.tanh(self.lin(x)).mean(1))


@pytest.mark.parametrize("bias", [True, False])
def test_linear_2d(bias):
    model = nn.Sequential(nn.Linear(6, 9, bias=bias), nn.Tanh(), nn.Linear(9, 4, bias=bias))
    check(model, torch.randn(11, 6), torch.randint(0, 4, (11,)))


@pytest.mark.parametrize("bias", [True, False])
def test_linear_3d_input_sums_over_positions(bias):
    check(Seq(bias=bias), torch.randn(8, 5, 5), torch.randint(0, 3, (8,)))


def head(channels, spatial_dims, classes=3):
    pool = nn.AdaptiveAvgPool1d(1) if spatial_dims == 1 else nn.AdaptiveAvgPool2d(1)
    return [nn.Tanh(), pool, nn.Flatten(), nn.Linear(channels, classes)]


def force_path(monkeypatch, path):
    """Route every convolution through one way of materializing per-example gradients
    (grouped weight-gradient convolution, or unfold + bmm one example at a time)."""
    from study.grads import conv
    limit = 1 if path == "grouped" else 10 ** 9
    monkeypatch.setattr(conv, "GROUPED_MIN_CHANNELS", limit)
    monkeypatch.setattr(conv, "GROUPED_MIN_POSITIONS", limit)
    monkeypatch.setattr(conv, "UNFOLD_CHUNK", 1)


CONV2D = [{"kernel_size": 3}, {"kernel_size": (2, 3), "stride": (2, 1), "padding": (1, 0)},
          {"kernel_size": 3, "dilation": 2, "padding": 2},
          {"kernel_size": 3, "groups": 2, "stride": 2},
          {"kernel_size": 1, "stride": 2}, {"kernel_size": 1}, {"kernel_size": (1, 3),
                                                                   "groups": 2, "padding": 1}]


@pytest.mark.parametrize("kw", CONV2D)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("cin", [4, 16])
@pytest.mark.parametrize("path", ["grouped", "unfold"])
def test_conv2d(kw, bias, cin, path, monkeypatch):
    force_path(monkeypatch, path)
    model = nn.Sequential(nn.Conv2d(cin, 6, bias=bias, **kw), *head(6, 2))
    check(model, torch.randn(5, cin, 7, 9), torch.randint(0, 3, (5,)))


@pytest.mark.parametrize("kw", [{"kernel_size": 3}, {"kernel_size": 4, "stride": 3, "padding": 2},
                                {"kernel_size": 3, "dilation": 2, "groups": 2},
                                {"kernel_size": 1, "stride": 2}])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("cin", [4, 16])
@pytest.mark.parametrize("path", ["grouped", "unfold"])
def test_conv1d(kw, bias, cin, path, monkeypatch):
    force_path(monkeypatch, path)
    model = nn.Sequential(nn.Conv1d(cin, 6, bias=bias, **kw), *head(6, 1))
    check(model, torch.randn(5, cin, 13), torch.randint(0, 3, (5,)))


def test_conv_padding_same():
    model = nn.Sequential(nn.Conv2d(3, 4, 4, padding="same"), *head(4, 2))
    check(model, torch.randn(4, 3, 6, 6), torch.randint(0, 3, (4,)))


def test_groupnorm_and_layernorm_closed_forms():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.GroupNorm(4, 8), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.LayerNorm(8),
                          nn.Linear(8, 3))
    with torch.no_grad():  # non-trivial affine parameters
        for m in (model[1], model[5]):
            m.weight.uniform_(0.5, 1.5)
            m.bias.uniform_(-0.5, 0.5)
    check(model, torch.randn(6, 3, 8, 8), torch.randint(0, 3, (6,)))


def test_groupnorm_through_generic_fallback_agrees():
    gn = nn.GroupNorm(2, 6).double()
    with torch.no_grad():
        gn.weight.uniform_(0.5, 1.5)
    a = torch.randn(4, 6, 3, 5, dtype=torch.float64)
    g = torch.randn(4, 6, 3, 5, dtype=torch.float64)
    wanted = [gn.weight, gn.bias]
    stored = saved_statistics(gn, gn(a), 4)
    assert stored is not None
    recomputed = groupnorm_stats(gn, a, g, wanted, True)          # x̂ recomputed
    saved = groupnorm_stats(gn, a, g, wanted, True, saved=stored)  # forward's mean/rstd
    generic = fallback_stats(gn, a, g, wanted, True)
    for closed in (recomputed, saved):
        assert rel(closed.norms_sq, generic.norms_sq) < TOL
        for p in wanted:
            assert rel(closed.sums[p], generic.sums[p]) < TOL
            assert rel(closed.sum_sqs[p], generic.sum_sqs[p]) < TOL


@pytest.mark.parametrize("make, shape", [
    (lambda: MLP(12, [10, 8], 5), (7, 12)),
    (lambda: CNN1d(1, 40, [6, 6, 6], 5), (6, 1, 40)),
    (lambda: LeNet((1, 28, 28), [4, 6], 20, 5), (4, 1, 28, 28)),
    (lambda: ResNet8(3, [4, 8, 8], 5, "group"), (3, 3, 16, 16)),
    (lambda: ResNet8(3, [4, 8, 8], 5, "none"), (3, 3, 16, 16)),
    (lambda: ResNet(3, [4, 8, 8], 5, "group", blocks=3), (3, 3, 8, 8)),    # ResNet-20
    (lambda: ResNet(3, [4, 8, 8], 5, "none", blocks=5), (2, 3, 8, 8)),     # ResNet-32
])
def test_models(make, shape):
    check(make(), torch.randn(*shape), torch.randint(0, 5, (shape[0],)))


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_reduced_loss_is_rescaled(reduction):
    def reduced(logits, y):
        return F.cross_entropy(logits, y, reduction=reduction)
    model = MLP(6, [5], 3)
    check(model, torch.randn(9, 6), torch.randint(0, 3, (9,)), loss=reduced,
          reduction=reduction)


def test_subset_of_params_keeps_order():
    model = MLP(6, [5, 4], 3).double()
    params = [model[5].weight, model[1].bias, model[3].weight]
    check(model, torch.randn(7, 6), torch.randint(0, 3, (7,)), params=params)


def test_chunked_materialization_matches(monkeypatch):
    """Layers too wide for the memory budget are materialized in batch chunks."""
    from study.grads import layer
    monkeypatch.setattr(layer, "MATERIALIZE_BUDGET", 700)
    model = nn.Sequential(nn.Conv2d(16, 6, 3), nn.Conv2d(6, 5, 3), *head(5, 2))
    check(model, torch.randn(7, 16, 8, 8), torch.randint(0, 3, (7,)))
    check(Seq(), torch.randn(7, 5, 5), torch.randint(0, 3, (7,)))


def test_conv_gram_norms_match_materialized():
    conv = nn.Conv2d(4, 6, 3, padding=1, groups=2).double()
    a = torch.randn(5, 4, 6, 6, dtype=torch.float64)
    g = torch.randn(5, 6, 6, 6, dtype=torch.float64)
    wanted = [conv.weight]
    mat = conv_stats(conv, a, g, wanted, True, second_moment=False, plan="materialize")
    gram = conv_stats(conv, a, g, wanted, True, second_moment=False, plan="gram")
    assert rel(gram.norms_sq, mat.norms_sq) < TOL
    assert rel(gram.sums[conv.weight], mat.sums[conv.weight]) < TOL


def test_conv_plan_prefers_gram_only_for_few_positions_without_second_moment():
    assert conv_plan(128, 512, 4608, 4, second_moment=False) == "gram"
    assert conv_plan(128, 16, 144, 1024, second_moment=False) == "materialize"
    assert conv_plan(128, 512, 4608, 4, second_moment=True) == "materialize"


def test_norms_off_and_second_moment_off():
    model = MLP(6, [5], 3)
    batch = (torch.randn(4, 6), torch.randint(0, 3, (4,)))
    stats = batch_stats(model, loss_fn, batch, norms=False, second_moment=False)
    assert stats.norms_sq is None and stats.sum_sq is None
    full = batch_stats(model, loss_fn, batch)
    for a, b in zip(stats.sum, full.sum):
        assert torch.equal(a, b)


def test_bad_input_names_the_field():
    model = MLP(6, [5], 3)
    batch = (torch.randn(4, 6), torch.randint(0, 3, (4,)))
    with pytest.raises(ValueError, match="reduction"):
        batch_stats(model, loss_fn, batch, reduction="avg")
    with pytest.raises(ValueError, match="reduction='none'"):
        batch_stats(model, lambda o, t: F.cross_entropy(o, t), batch)
    with pytest.raises(ValueError, match="params"):
        batch_stats(model, loss_fn, batch, params=[nn.Parameter(torch.zeros(2))])
    with torch.no_grad(), pytest.raises(ValueError, match="no_grad"):
        batch_stats(model, loss_fn, batch)
    inplace = nn.Sequential(nn.Linear(6, 5), nn.ReLU(inplace=True), nn.Linear(5, 3))
    with pytest.raises(ValueError, match="in place"):
        batch_stats(inplace, loss_fn, batch)
