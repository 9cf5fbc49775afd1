"""The networks a trial trains: MLP, CNN (1-D for MNIST-1D, LeNet-style 2-D for images) and
the CIFAR ResNets 8/20/32 without BatchNorm (GroupNorm or no normalization: per-example
gradients are not defined under train-mode BatchNorm, so no model here uses it)."""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

RESNET_BLOCKS = {"resnet8": 1, "resnet20": 3, "resnet32": 5}   # basic blocks per stage
MODELS = ("mlp", "cnn", *RESNET_BLOCKS)
ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid}
INITS = ("default", "he_normal", "normal", "linspace")


def build_model(name: str, input_shape: tuple[int, ...], num_classes: int,
                widths: list[int] | None = None, channels: list[int] | None = None,
                norm: str = "group", activation: str | None = None,
                init: str | dict[str, Any] | None = None) -> nn.Module:
    """A model for inputs of ``input_shape`` (without the batch dimension); ``init`` re-draws
    its parameters after torch's own initialization (see ``initialize``)."""
    if activation is not None and name != "mlp":
        raise ValueError(f"model.activation: only mlp has one to choose (got {name})")
    return initialize(_architecture(name, input_shape, num_classes, widths, channels, norm,
                                    activation or "relu"), init)


def _architecture(name, input_shape, num_classes, widths, channels, norm, activation):
    if name == "mlp":
        return MLP(math.prod(input_shape), widths or [100, 100], num_classes, activation)
    if name == "cnn":
        if len(input_shape) == 2:
            return CNN1d(input_shape[0], input_shape[1], channels or [25, 25, 25], num_classes)
        return LeNet(input_shape, channels or [20, 50], (widths or [500])[0], num_classes)
    if name in RESNET_BLOCKS:
        if len(input_shape) != 3:
            raise ValueError(f"model.name: {name} needs image inputs (C, H, W)")
        return ResNet(input_shape[0], channels or [16, 32, 64], num_classes, norm,
                      RESNET_BLOCKS[name])
    raise ValueError(f"model.name: unknown model {name!r}; choose from {list(MODELS)}")


def initialize(model: nn.Module, init: str | dict[str, Any] | None) -> nn.Module:
    """Re-draw the parameters (from torch's global generator, seeded by the trial):

    - ``default`` / None: torch's own initialization, untouched (no random numbers drawn);
    - ``he_normal``: every Linear / Conv weight N(0, 2 / fan_in) (He et al. 2015, for ReLU;
      sngrad's MLP), biases zero;
    - ``{kind: normal, std: s}``: every Linear / Conv weight N(0, s²), biases zero;
    - ``linspace``: the gradient-scales notebook's deliberately bad initialization: the i-th
      parameter tensor (``model.parameters()`` order, biases and norms included) is
      ``linspace(0, i % 3 - 1, numel)``, so one tensor in three is all zeros.
    """
    kind, std = (init, None) if not isinstance(init, dict) else (init["kind"], init.get("std"))
    if kind in (None, "default"):
        return model
    if kind not in INITS:
        raise ValueError(f"model.init: {kind!r} is not one of {list(INITS)}")
    if kind == "normal" and not (isinstance(std, (int, float)) and std > 0):
        raise ValueError(f"model.init.std: normal needs a std > 0 (got {std!r})")
    with torch.no_grad():
        if kind == "linspace":
            for i, p in enumerate(model.parameters()):
                p.copy_(torch.linspace(0, i % 3 - 1, p.numel()).reshape(p.shape))
            return model
        for m in model.modules():
            if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)):
                if kind == "he_normal":
                    nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
                else:
                    nn.init.normal_(m.weight, 0.0, std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
    return model


class MLP(nn.Sequential):
    """Flatten, then Linear + activation (ReLU by default) for each width, then a Linear
    classifier."""

    def __init__(self, in_features: int, widths: list[int], num_classes: int,
                 activation: str = "relu"):
        if activation not in ACTIVATIONS:
            raise ValueError(f"model.activation: {activation!r} is not one of "
                             f"{list(ACTIVATIONS)}")
        layers: list[nn.Module] = [nn.Flatten()]
        for w in widths:
            layers += [nn.Linear(in_features, w), ACTIVATIONS[activation]()]
            in_features = w
        layers.append(nn.Linear(in_features, num_classes))
        super().__init__(*layers)


class CNN1d(nn.Sequential):
    """The MNIST-1D paper's ConvBase: three stride-2 Conv1d layers and a Linear classifier."""

    def __init__(self, in_channels: int, length: int, channels: list[int], num_classes: int):
        layers: list[nn.Module] = []
        for i, c in enumerate(channels):
            k = 5 if i == 0 else 3
            layers += [nn.Conv1d(in_channels, c, k, stride=2, padding=1), nn.ReLU()]
            length = (length + 2 - k) // 2 + 1
            in_channels = c
        layers += [nn.Flatten(), nn.Linear(in_channels * length, num_classes)]
        super().__init__(*layers)


class LeNet(nn.Sequential):
    """conv20-pool-conv50-pool-fc500-fc10 (the well-tempered notebook's LeNet)."""

    def __init__(self, input_shape: tuple[int, ...], channels: list[int], hidden: int,
                 num_classes: int):
        c, h, w = input_shape
        c1, c2 = channels
        layers = [nn.Conv2d(c, c1, 5), nn.ReLU(), nn.MaxPool2d(2),
                  nn.Conv2d(c1, c2, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten()]
        h, w = ((h - 4) // 2 - 4) // 2, ((w - 4) // 2 - 4) // 2
        layers += [nn.Linear(c2 * h * w, hidden), nn.ReLU(), nn.Linear(hidden, num_classes)]
        super().__init__(*layers)


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "group":
        return nn.GroupNorm(min(8, channels), channels)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"model.norm: {kind!r} is not one of ['group', 'none']")


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, norm: str):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=norm == "none")
        self.n1 = _norm(norm, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=norm == "none")
        self.n2 = _norm(norm, cout)
        self.relu = nn.ReLU()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                          _norm(norm, cout))

    def forward(self, x):
        out = self.relu(self.n1(self.conv1(x)))
        return self.relu(self.n2(self.conv2(out)) + self.shortcut(x))


class ResNet(nn.Module):
    """The CIFAR ResNet of He et al. (2016, §4.2): a 3×3 stem, then one stage per entry of
    ``channels`` (16/32/64) of ``blocks`` basic blocks each (the first of a later stage halves
    the resolution), global average pooling and a Linear classifier: 6·blocks + 2 weight
    layers (ResNet-8, -20, -32 for 1, 3, 5). Shortcuts that change shape are 1×1 projections
    (the paper's option B; its CIFAR nets pad with zeros, option A). The blocks form one flat
    ``blocks`` sequence, so ResNet-8 keeps its parameter names and initialization order."""

    def __init__(self, in_channels: int, channels: list[int], num_classes: int, norm: str,
                 blocks: int = 1):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, channels[0], 3, 1, 1,
                                            bias=norm == "none"),
                                  _norm(norm, channels[0]), nn.ReLU())
        layers, cin = [], channels[0]
        for i, c in enumerate(channels):
            for j in range(blocks):
                layers.append(BasicBlock(cin, c, 2 if i > 0 and j == 0 else 1, norm))
                cin = c
        self.blocks = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                  nn.Linear(cin, num_classes))

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)))


ResNet8 = ResNet     # ResNet(...) with blocks=1, under the name the benchmarks import
