"""Record each layer's input and output gradient during one forward+backward.

Per-example gradient statistics (``study.grads``), GC's distances and K-FAC's factors all
start from the same two tensors per layer: the input ``a`` the layer saw and the gradient
``g`` of the backpropagated scalar with respect to the layer's output. This module records
them with hooks, without changing what the forward or backward computes.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

SUPPORTED = (nn.Linear, nn.Conv1d, nn.Conv2d)


@dataclass
class LayerRecord:
    module: nn.Module
    a: torch.Tensor | None = None       # the layer's input (detached)
    g: torch.Tensor | None = None       # d(scalar)/d(output) (detached)


@dataclass
class Capture:
    records: dict[nn.Module, LayerRecord] = field(default_factory=dict)

    def __iter__(self) -> Iterator[LayerRecord]:
        return iter(self.records.values())


def layers_with_params(model: nn.Module) -> list[nn.Module]:
    """Leaf modules that own trainable parameters directly, in ``model.parameters()`` order."""
    return [m for m in model.modules()
            if any(p.requires_grad for p in m.parameters(recurse=False))]


@contextmanager
def capture(model: nn.Module, modules: list[nn.Module] | None = None,
            backward: bool = True) -> Iterator[Capture]:
    """Inside the block, forward passes record inputs of ``modules`` (default: every
    supported layer with parameters) and, with ``backward=True``, backward passes record the
    output gradients. Records of the last pass win."""
    if modules is None:
        modules = [m for m in layers_with_params(model) if isinstance(m, SUPPORTED)]
    cap = Capture({m: LayerRecord(m) for m in modules})
    handles = []

    def forward_hook(module, inputs, output):
        rec = cap.records[module]
        rec.a = inputs[0].detach()
        if backward and output.requires_grad:
            def save_grad(grad, rec=rec):
                rec.g = grad.detach()
            output.register_hook(save_grad)

    try:
        for m in modules:
            handles.append(m.register_forward_hook(forward_hook))
        yield cap
    finally:
        for h in handles:
            h.remove()
