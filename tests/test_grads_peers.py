"""``batch_stats`` against its peers as oracles (torch.func over the whole model, BackPACK),
in float64, on the study's models and on the issue's models outside them; and the layers
the peers get wrong or lack (reflect padding, Embedding + LayerNorm, modules with several
inputs), checked against the per-example loop."""
from __future__ import annotations

import warnings

import pytest
import torch
from peers import Unsupported, ce, extra_models, run_peer
from reference import per_example_grads
from torch import nn

from study.grads import batch_stats
from study.grads.fallback import fallback_stats
from study.grads.layer_types import FALLBACK, stats_kind
from study.grads.linear import bilinear_stats
from study.models import MLP, LeNet, ResNet8

TOL = 1e-10


def models():
    own = {
        "mlp": (lambda: MLP(12, [10, 8], 10), lambda: (torch.randn(7, 12),
                                                      torch.randint(0, 10, (7,)))),
        "lenet": (lambda: LeNet((1, 28, 28), [4, 6], 20, 10),
                  lambda: (torch.randn(4, 1, 28, 28), torch.randint(0, 10, (4,)))),
        "resnet8-group": (lambda: ResNet8(3, [4, 8, 8], 10, "group"),
                          lambda: (torch.randn(3, 3, 16, 16), torch.randint(0, 10, (3,)))),
    }
    return {**own, **extra_models(5, small=True)}


# What BackPACK 1.7.1 does on each model: no extension for GroupNorm, LayerNorm, Bilinear;
# its convolutions unfold with zeros whatever the padding mode.
BACKPACK = {"resnet8-group": "n/a", "text-emb-ln": "n/a", "bilinear": "n/a",
            "reflect-conv": "wrong"}


def float64(name):
    torch.manual_seed(0)
    make, data = models()[name]
    model = make().double()
    with torch.no_grad():                  # non-trivial norm affine parameters
        for m in model.modules():
            if isinstance(m, (nn.GroupNorm, nn.LayerNorm)):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    x, y = data()
    return model, (x.double() if x.is_floating_point() else x), y


def rel(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def worst(stats, got) -> float:
    sums, sqs, norms = got
    return max(*(rel(a, b) for a, b in zip(stats.sum, sums)),
               *(rel(a, b) for a, b in zip(stats.sum_sq, sqs)), rel(stats.norms_sq, norms))


@pytest.mark.parametrize("peer", ["torch.func", "backpack"])
@pytest.mark.parametrize("name", list(models()))
def test_batch_stats_matches_peer(name, peer):
    if peer == "backpack":
        pytest.importorskip("backpack")
    model, x, y = float64(name)
    stats = batch_stats(model, ce, (x, y))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expect = BACKPACK.get(name, "match") if peer == "backpack" else "match"
        if expect == "n/a":
            with pytest.raises(Unsupported):
                run_peer(peer, model, x, y)
            return
        got = run_peer(peer, model, x, y)
    if expect == "wrong":                  # the peer errs; the per-example loop decides
        assert worst(stats, got) > 1e-3
        per = per_example_grads(model, x, y, loss=ce)
        got = ([g.sum(0) for g in per], [(g * g).sum(0) for g in per],
               sum((g.reshape(len(y), -1) ** 2).sum(1) for g in per))
    assert worst(stats, got) < TOL


def test_opacus_agrees_where_it_runs():
    pytest.importorskip("opacus")
    model, x, y = float64("text-emb-ln")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = run_peer("opacus", model, x, y)
    assert worst(batch_stats(model, ce, (x, y)), got) < TOL


def loop_truth(model, x, y):
    per = per_example_grads(model, x, y, loss=ce)
    return ([g.sum(0) for g in per], [(g * g).sum(0) for g in per],
            sum((g.reshape(len(y), -1) ** 2).sum(1) for g in per))


@pytest.mark.parametrize("conv", [
    lambda: nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"),
    lambda: nn.Conv2d(3, 4, (2, 3), padding=(1, 2), padding_mode="replicate", stride=2),
    lambda: nn.Conv2d(3, 4, 3, padding=1, padding_mode="circular", bias=False),
    lambda: nn.Conv2d(3, 4, 4, padding="same"),                        # asymmetric
    lambda: nn.Conv2d(3, 4, 3, padding="same", padding_mode="reflect", dilation=2),
    lambda: nn.Conv1d(3, 4, 3, padding=2, padding_mode="reflect"),
])
def test_conv_padding_modes_have_their_own_handler(conv):
    conv = conv().double()
    assert stats_kind(conv) is not FALLBACK
    pool = nn.AdaptiveAvgPool1d(1) if isinstance(conv, nn.Conv1d) else nn.AdaptiveAvgPool2d(1)
    model = nn.Sequential(conv, nn.Tanh(), pool, nn.Flatten(), nn.Linear(4, 10)).double()
    x = torch.randn(4, 3, 9) if isinstance(conv, nn.Conv1d) else torch.randn(4, 3, 7, 8)
    x, y = x.double(), torch.randint(0, 10, (4,))
    assert worst(batch_stats(model, ce, (x, y)), loop_truth(model, x, y)) < TOL


def test_embedding_padding_idx_and_repeated_tokens():
    model = nn.Sequential(nn.Embedding(7, 3, padding_idx=0), nn.Flatten(),
                          nn.Linear(12, 10)).double()
    x = torch.tensor([[0, 1, 1, 2], [3, 3, 3, 0], [6, 5, 6, 0]])
    y = torch.randint(0, 10, (3,))
    assert worst(batch_stats(model, ce, (x, y)), loop_truth(model, x, y)) < TOL


class Gate(nn.Module):
    """A custom layer with two tensor inputs (one by keyword) and a shared, unbatched one."""

    def __init__(self, d=4, h=5):
        super().__init__()
        self.w = nn.Parameter(torch.randn(h, d))
        self.v = nn.Parameter(torch.randn(h, d))

    def forward(self, x1, x2, *, scale=None, shared=None):
        out = (x1 @ self.w.t()) * torch.sigmoid(x2 @ self.v.t())
        return out * scale + shared


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate = Gate()
        self.shared = torch.randn(5)
        self.out = nn.Linear(5, 10)

    def forward(self, x):
        return self.out(self.gate(x[:, :4], x[:, 4:], scale=x[:, :1], shared=self.shared))


def test_fallback_takes_every_input_of_a_module():
    torch.manual_seed(0)
    model = TwoInputs().double()
    model.shared = model.shared.double()
    x, y = torch.randn(6, 8, dtype=torch.float64), torch.randint(0, 10, (6,))
    assert stats_kind(model.gate) is FALLBACK
    assert worst(batch_stats(model, ce, (x, y)), loop_truth(model, x, y)) < TOL


@pytest.mark.parametrize("positions", [(), (3,)])
def test_bilinear_closed_form_equals_fallback(positions):
    torch.manual_seed(0)
    bil = nn.Bilinear(3, 4, 5).double()
    x1 = torch.randn(6, *positions, 3, dtype=torch.float64)
    x2 = torch.randn(6, *positions, 4, dtype=torch.float64)
    g = torch.randn(6, *positions, 5, dtype=torch.float64)
    wanted = [bil.weight, bil.bias]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")     # vmap has no batching rule for _trilinear
        generic = fallback_stats(bil, x1, g, wanted, True, inputs=(x1, x2))
    closed = bilinear_stats(bil, x1, g, wanted, True, inputs=(x1, x2))
    assert rel(closed.norms_sq, generic.norms_sq) < TOL
    for p in wanted:
        assert rel(closed.sums[p], generic.sums[p]) < TOL
        assert rel(closed.sum_sqs[p], generic.sum_sqs[p]) < TOL


class Pair(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(3))

    def forward(self, x):
        return x * self.w, x


class Unbatched(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(3))

    def forward(self, x):
        return x * self.w


def test_unsupported_modules_are_named():
    pair = nn.Sequential(nn.Linear(3, 3), Pair())
    with pytest.raises(NotImplementedError, match="Pair returns tuple"):
        batch_stats(pair, lambda out, y: out[0].sum(1), (torch.randn(4, 3), torch.zeros(4)))
    m = Unbatched()
    a, g = torch.randn(3), torch.randn(3)       # no batch dimension anywhere
    with pytest.raises(NotImplementedError, match="Unbatched has no input with the batch"):
        fallback_stats(m, a, g.expand(4, 3), [m.w], True)


class Affine(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.w = nn.Parameter(torch.rand(d) + 0.5)
        self.b = nn.Parameter(torch.randn(d))

    def forward(self, x):
        return x * self.w + self.b


class Dense(nn.Module):
    def __init__(self, d, o):
        super().__init__()
        self.w = nn.Parameter(torch.randn(o, d))

    def forward(self, x):
        return x @ self.w.t()


def test_only_custom_layers_run_torch_func_over_the_whole_model(monkeypatch):
    from study.grads import stats

    torch.manual_seed(0)
    model = nn.Sequential(Affine(6), nn.Tanh(), Dense(6, 10)).double()
    x, y = torch.randn(5, 6, dtype=torch.float64), torch.randint(0, 10, (5,))
    expected = loop_truth(model, x, y)
    monkeypatch.setattr(stats, "capture", None)       # the engine's own pass is not used
    got = batch_stats(model, ce, (x, y))
    assert worst(got, expected) < TOL
    mean = batch_stats(model, lambda out, t: ce(out, t).mean(), (x, y), reduction="mean")
    assert worst(mean, expected) < TOL and mean.loss == pytest.approx(got.loss)
