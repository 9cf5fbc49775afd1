"""Record each layer's input, output and output gradient during a forward (+ backward).

Per-example gradient statistics, GC's distances and K-FAC's factors all start from the same
two tensors per layer: the input ``a`` the layer saw and the gradient ``g`` of the
backpropagated scalar with respect to the layer's output. This module records them with
hooks, without changing what the forward or backward computes. ``g`` comes either from a
hook on the output during an ordinary backward (``output_grads``), or from the caller asking
autograd for the gradient with respect to the kept outputs (``keep_outputs``), which skips
every weight-gradient product.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from study.grads.layer_types import kronecker_layers


@dataclass
class LayerRecord:
    module: nn.Module
    a: torch.Tensor | None = None       # the layer's (first) input (detached)
    inputs: tuple = ()                  # all positional inputs (tensors detached)
    kwargs: dict = field(default_factory=dict)  # keyword inputs (tensors detached)
    g: torch.Tensor | None = None       # d(scalar)/d(output) (detached), with output_grads
    output: torch.Tensor | None = None  # the output itself, with keep_outputs
    version: int = 0                    # output._version when recorded
    calls: int = 0                      # forward calls inside the block

    def modified_in_place(self) -> bool:
        """The kept output was changed in place after the layer returned it (its gradient
        would then belong to the changed tensor)."""
        return self.output._version != self.version


@dataclass
class Capture:
    records: dict[nn.Module, LayerRecord] = field(default_factory=dict)

    def __iter__(self) -> Iterator[LayerRecord]:
        return iter(self.records.values())


@contextmanager
def capture(model: nn.Module, modules: list[nn.Module] | None = None, *,
            output_grads: bool = True, keep_outputs: bool = False) -> Iterator[Capture]:
    """Inside the block, forward passes record inputs of ``modules`` (default: every layer
    with Kronecker factors and trainable parameters), and their outputs with
    ``keep_outputs``; with ``output_grads`` backward passes record the output gradients.
    Records of the last call win; ``calls`` counts them."""
    if modules is None:
        modules = kronecker_layers(model)
    cap = Capture({m: LayerRecord(m) for m in modules})

    def forward_hook(module, inputs, kwargs, output):
        if not isinstance(output, torch.Tensor):
            raise NotImplementedError(f"{type(module).__name__} returns "
                                      f"{type(output).__name__}, not one tensor")
        rec = cap.records[module]
        rec.calls += 1
        rec.inputs = tuple(_detached(t) for t in inputs)
        rec.kwargs = {k: _detached(v) for k, v in kwargs.items()}
        rec.a = next((t for t in (*rec.inputs, *rec.kwargs.values())
                      if isinstance(t, torch.Tensor)), None)
        if keep_outputs:
            rec.output, rec.version = output, output._version
        if output_grads and output.requires_grad:
            def save_grad(grad, rec=rec):
                rec.g = grad.detach()
            output.register_hook(save_grad)

    handles = []
    try:
        for m in modules:
            handles.append(m.register_forward_hook(forward_hook, with_kwargs=True))
        yield cap
    finally:
        for h in handles:
            h.remove()


def _detached(value):
    return value.detach() if isinstance(value, torch.Tensor) else value
