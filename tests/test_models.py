"""Models: output shapes for each dataset's inputs, parameter counts worked out by hand (so a
changed architecture cannot slip by), no BatchNorm anywhere (per-example gradients need
examples that do not interact), and errors that name the spec field."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from study.models import MLP, CNN1d, LeNet, ResNet8, build_model


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _conv(cin, cout, k, bias=True):
    return cin * cout * k + (cout if bias else 0)


def test_mlp_shape_and_count():
    model = build_model("mlp", (1, 40), 10)
    assert isinstance(model, MLP)
    assert model(torch.randn(7, 1, 40)).shape == (7, 10)
    assert _n_params(model) == (40 * 100 + 100) + (100 * 100 + 100) + (100 * 10 + 10)
    wide = build_model("mlp", (1, 28, 28), 10, widths=[1024, 1024])  # Faghri's MNIST MLP
    assert wide(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    assert _n_params(wide) == (784 * 1024 + 1024) + (1024 * 1024 + 1024) + (1024 * 10 + 10)


def test_cnn1d_matches_mnist1d_convbase():
    model = build_model("cnn", (1, 40), 10)
    assert isinstance(model, CNN1d)
    assert model(torch.randn(5, 1, 40)).shape == (5, 10)
    # lengths 40 -> 19 -> 10 -> 5, so the classifier sees 25 * 5 = 125 features (the paper's)
    assert _n_params(model) == (_conv(1, 25, 5) + _conv(25, 25, 3) + _conv(25, 25, 3)
                                + 125 * 10 + 10)


def test_lenet_shape_and_count():
    model = build_model("cnn", (1, 28, 28), 10)
    assert isinstance(model, LeNet)
    assert model(torch.randn(3, 1, 28, 28)).shape == (3, 10)
    # 28 -conv5-> 24 -pool-> 12 -conv5-> 8 -pool-> 4: fc sees 50*4*4; Caffe's LeNet: 431,080
    assert _n_params(model) == 431_080
    colour = build_model("cnn", (3, 32, 32), 10)
    assert colour(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def _resnet8_count(norm: str, c=(16, 32, 64), classes=10) -> int:
    bias = norm == "none"
    norm_params = (lambda ch: 2 * ch) if norm == "group" else (lambda ch: 0)
    total = _conv(3, c[0], 9, bias) + norm_params(c[0])
    cin = c[0]
    for ch in c:
        total += _conv(cin, ch, 9, bias) + _conv(ch, ch, 9, bias) + 2 * norm_params(ch)
        if cin != ch:
            total += _conv(cin, ch, 1, bias=False) + norm_params(ch)
        cin = ch
    return total + c[-1] * classes + classes


@pytest.mark.parametrize("norm", ["group", "none"])
def test_resnet8_shape_count_and_no_batchnorm(norm):
    model = build_model("resnet8", (3, 32, 32), 10, norm=norm)
    assert isinstance(model, ResNet8)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert _n_params(model) == _resnet8_count(norm)
    kinds = {type(m) for m in model.modules()}
    assert not any(issubclass(k, nn.modules.batchnorm._BatchNorm) for k in kinds)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 1 + 3 * 2 + 2  # stem, two per block, two projection shortcuts
    if norm == "group":
        groups = [m for m in model.modules() if isinstance(m, nn.GroupNorm)]
        assert len(groups) == 1 + 3 * 2 + 2
        assert all(g.num_channels % g.num_groups == 0 for g in groups)
    else:
        assert not any(isinstance(m, (nn.GroupNorm, nn.LayerNorm)) for m in model.modules())


@pytest.mark.parametrize("name,shape", [("mlp", (1, 40)), ("cnn", (1, 40)),
                                        ("cnn", (1, 28, 28)), ("resnet8", (3, 32, 32))])
def test_examples_do_not_interact(name, shape):
    """Train-mode outputs of one example do not depend on the rest of the batch (the
    premise of per-example gradients; train-mode BatchNorm would break it)."""
    torch.manual_seed(0)
    model = build_model(name, shape, 10).double().train()
    x = torch.randn(4, *shape, dtype=torch.float64)
    alone = torch.cat([model(x[i:i + 1]) for i in range(4)])
    torch.testing.assert_close(model(x), alone, rtol=1e-10, atol=1e-12)


def test_bad_model_inputs_name_the_field():
    with pytest.raises(ValueError, match="model.name"):
        build_model("transformer", (1, 40), 10)
    with pytest.raises(ValueError, match="model.name"):
        build_model("resnet8", (1, 40), 10)  # needs images
    with pytest.raises(ValueError, match="model.norm"):
        build_model("resnet8", (3, 32, 32), 10, norm="batch")
