"""Models: output shapes for each dataset's inputs, parameter counts worked out by hand (so a
changed architecture cannot slip by), no BatchNorm anywhere (per-example gradients need
examples that do not interact), and errors that name the spec field."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from study.models import MLP, CNN1d, LeNet, ResNet, ResNet8, build_model


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


def _resnet_count(norm: str, blocks: int = 1, c=(16, 32, 64), classes=10) -> int:
    bias = norm == "none"
    norm_params = (lambda ch: 2 * ch) if norm == "group" else (lambda ch: 0)
    total = _conv(3, c[0], 9, bias) + norm_params(c[0])
    cin = c[0]
    for ch in c:
        for _ in range(blocks):
            total += _conv(cin, ch, 9, bias) + _conv(ch, ch, 9, bias) + 2 * norm_params(ch)
            if cin != ch:
                total += _conv(cin, ch, 1, bias=False) + norm_params(ch)
            cin = ch
    return total + c[-1] * classes + classes


@pytest.mark.parametrize("name,blocks", [("resnet8", 1), ("resnet20", 3), ("resnet32", 5)])
@pytest.mark.parametrize("norm", ["group", "none"])
def test_resnet_shape_count_and_no_batchnorm(name, blocks, norm):
    model = build_model(name, (3, 32, 32), 10, norm=norm)
    assert isinstance(model, ResNet)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert _n_params(model) == _resnet_count(norm, blocks)
    kinds = {type(m) for m in model.modules()}
    assert not any(issubclass(k, nn.modules.batchnorm._BatchNorm) for k in kinds)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 1 + 3 * blocks * 2 + 2  # stem, two per block, two projections
    assert sum(c.stride == (2, 2) for c in convs) == 4   # two stages start at half size
    if norm == "group":
        groups = [m for m in model.modules() if isinstance(m, nn.GroupNorm)]
        assert len(groups) == 1 + 3 * blocks * 2 + 2
        assert all(g.num_channels % g.num_groups == 0 for g in groups)
    else:
        assert not any(isinstance(m, (nn.GroupNorm, nn.LayerNorm)) for m in model.modules())


def test_resnet20_and_32_have_the_papers_size():
    """He et al. (2016) Table 6: 0.27M and 0.46M parameters; with BatchNorm's 2 per channel
    and option-A shortcuts exactly 269,722 and 464,154 (akamaster/pytorch_resnet_cifar10).
    GroupNorm has BatchNorm's parameters; the projections add 16·32 + 32·64 weights and their
    norms 2·(32 + 64)."""
    projections = 16 * 32 + 32 * 64 + 2 * (32 + 64)
    assert _n_params(build_model("resnet20", (3, 32, 32), 10)) == 269_722 + projections
    assert _n_params(build_model("resnet32", (3, 32, 32), 10)) == 464_154 + projections


def test_resnet8_keeps_its_parameter_names_and_initialization():
    torch.manual_seed(0)
    generic = ResNet(3, [16, 32, 64], 10, "group", blocks=1)
    torch.manual_seed(0)
    built = build_model("resnet8", (3, 32, 32), 10)
    assert ResNet8 is ResNet and list(generic.state_dict()) == list(built.state_dict())
    assert [n for n, _ in built.named_parameters()][:4] == [
        "stem.0.weight", "stem.1.weight", "stem.1.bias", "blocks.0.conv1.weight"]
    assert all(torch.equal(a, b) for a, b in zip(generic.parameters(), built.parameters()))


@pytest.mark.parametrize("name,shape", [("mlp", (1, 40)), ("cnn", (1, 40)),
                                        ("cnn", (1, 28, 28)), ("resnet8", (3, 32, 32)),
                                        ("resnet20", (3, 16, 16))])
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
    with pytest.raises(ValueError, match="model.name: resnet32"):
        build_model("resnet32", (2,), 10)
    with pytest.raises(ValueError, match="model.norm"):
        build_model("resnet8", (3, 32, 32), 10, norm="batch")


# -- initialization and activation -------------------------------------------------------------

def _seeded(build, seed=0):
    torch.manual_seed(seed)
    return build()


def test_default_init_is_torchs_own_bit_for_bit():
    """The default study's models, built as before these options existed (the layers by hand,
    torch's own initialization in the same order) and with init: default."""
    def by_hand_mlp():
        return nn.Sequential(nn.Flatten(), nn.Linear(40, 100), nn.ReLU(), nn.Linear(100, 100),
                             nn.ReLU(), nn.Linear(100, 10))

    def by_hand_cnn():
        return nn.Sequential(nn.Conv1d(1, 25, 5, 2, 1), nn.ReLU(), nn.Conv1d(25, 25, 3, 2, 1),
                             nn.ReLU(), nn.Conv1d(25, 25, 3, 2, 1), nn.ReLU(), nn.Flatten(),
                             nn.Linear(125, 10))
    for name, kw, hand in [("mlp", {"widths": [100, 100]}, by_hand_mlp),
                           ("cnn", {"channels": [25, 25, 25]}, by_hand_cnn)]:
        expected = _seeded(hand).state_dict()
        drawn = torch.get_rng_state()        # the random numbers torch's init consumed
        for init in ({}, {"init": "default"}):
            torch.manual_seed(0)
            built = build_model(name, (1, 40), 10, **kw, **init)
            assert torch.equal(torch.get_rng_state(), drawn)   # no more, no fewer
            assert built.state_dict().keys() == expected.keys()
            for key, value in built.state_dict().items():
                assert torch.equal(value, expected[key]), (name, init, key)


def _kurtosis(w: torch.Tensor) -> float:
    z = (w - w.mean()) / w.std()
    return float((z ** 4).mean())


def test_he_normal_weights_have_std_sqrt_2_over_fan_in_and_zero_biases():
    model = _seeded(lambda: build_model("mlp", (1, 1024), 10, widths=[2048], init="he_normal"))
    w = model[1].weight.detach().double()
    n, sigma = w.numel(), (2 / 1024) ** 0.5
    assert abs(float(w.std()) / sigma - 1) < 5 * (1 / (2 * n)) ** 0.5   # sampling error of s
    assert abs(float(w.mean())) < 5 * sigma / n ** 0.5
    assert abs(_kurtosis(w) - 3) < 0.05      # a normal (not uniform 1.8, not truncated ~2.6)
    assert all(float(m.bias.detach().abs().max()) == 0 for m in (model[1], model[3]))
    conv = _seeded(lambda: build_model("cnn", (1, 28, 28), 10, init="he_normal"))[3]
    fan_in = 20 * 5 * 5                      # LeNet's second conv: 20 channels in, 5×5
    w = conv.weight.detach().double()
    assert abs(float(w.std()) / (2 / fan_in) ** 0.5 - 1) < 5 * (1 / (2 * w.numel())) ** 0.5


def test_normal_init_has_the_std_asked_for():
    for std in (1e-3, 10.0):
        torch.manual_seed(0)
        model = build_model("mlp", (1, 1024), 10, widths=[1024],
                            init={"kind": "normal", "std": std})
        w = model[1].weight.detach().double()
        assert abs(float(w.std()) / std - 1) < 5 * (1 / (2 * w.numel())) ** 0.5
        assert float(model[3].bias.detach().abs().max()) == 0


def test_the_gradient_scales_notebook_mlp_and_its_bad_initialization():
    """2-20-20-2 on 2-D points; parameter i is linspace(0, i % 3 - 1, numel): the first weight
    runs 0 -> -1, the first bias and the last weight are zeros, and so on."""
    model = build_model("mlp", (2,), 2, widths=[20, 20], activation="tanh", init="linspace")
    assert model(torch.randn(5, 2)).shape == (5, 2)
    assert _n_params(model) == (2 * 20 + 20) + (20 * 20 + 20) + (20 * 2 + 2)
    assert sum(isinstance(m, nn.Tanh) for m in model) == 2 and not any(
        isinstance(m, nn.ReLU) for m in model)
    params = list(model.parameters())
    ends = [-1, 0, 1, -1, 0, 1]
    for p, end in zip(params, ends):
        flat = p.detach().flatten().double()
        assert float(flat[0]) == 0 and float(flat[-1]) == pytest.approx(end, abs=1e-7)
        steps = flat.diff()
        assert torch.allclose(steps, torch.full_like(steps, end / (p.numel() - 1)), atol=1e-6)
    assert float(params[0].detach()[0, 1]) == pytest.approx(-1 / 39, abs=1e-7)   # row-major order


def test_activation_and_init_errors_name_the_field():
    with pytest.raises(ValueError, match="model.activation"):
        build_model("cnn", (1, 40), 10, activation="tanh")
    with pytest.raises(ValueError, match="model.activation"):
        build_model("mlp", (1, 40), 10, activation="gelu")
    with pytest.raises(ValueError, match="model.init"):
        build_model("mlp", (1, 40), 10, init="xavier")
    with pytest.raises(ValueError, match="model.init.std"):
        build_model("mlp", (1, 40), 10, init={"kind": "normal"})
