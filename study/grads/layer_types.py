"""The one table of layer types: which have their own per-example handler, which have
Kronecker factors (per-example weight gradient ``Σ_t g_t ⊗ ã_t``, ``patches.py``), and
which configurations those need. Per-example statistics, GC and K-FAC look layers up here
instead of checking types themselves. Model: f-dangel/backpack's ``module_exts`` table
(``backpack/extensions/backprop_extension.py``), looked up here along the type's MRO so that
subclasses (e.g. ``NonDynamicallyQuantizableLinear``) get their base class's entry.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from study.grads.conv import conv_stats
from study.grads.embedding import embedding_stats
from study.grads.fallback import fallback_stats
from study.grads.layer import LayerStats
from study.grads.linear import bilinear_stats, linear_stats
from study.grads.norm import groupnorm_stats, layernorm_stats, saved_layernorm, saved_statistics
from study.grads.patches import conv_inputs, conv_output_grads, linear_inputs, linear_output_grads


@dataclass(frozen=True)
class LayerKind:
    """What ``study.grads`` knows about one layer type."""

    stats: Callable[..., LayerStats]
    """Per-example statistics: ``(module, a, g, wanted, norms, second_moment)``."""
    inputs: Callable[..., torch.Tensor] | None = None
    """``ã`` of the Kronecker factors, ``(module, a, *, ones, channels_last)``; None: none."""
    output_grads: Callable[..., torch.Tensor] | None = None
    """``g`` of the Kronecker factors, ``(g, *, channels_last)``."""
    conv: bool = False
    """Unfolded like a convolution: its Kronecker factors need numeric zero padding
    (``conv_problem``; the per-example statistics pad other modes themselves)."""
    forward_saved: Callable[[nn.Module, torch.Tensor, int], Any] | None = None
    """Reads what the forward saved for the backward (before the backward frees it); the
    result goes to ``stats`` as ``saved=``."""
    all_inputs: bool = False
    """``stats`` gets every input of the forward as ``inputs=`` (tuple) and ``kwargs=``."""


_CONV = LayerKind(conv_stats, conv_inputs, conv_output_grads, conv=True)
LAYERS: dict[type[nn.Module], LayerKind] = {
    nn.Linear: LayerKind(linear_stats, linear_inputs, linear_output_grads),
    nn.Conv1d: _CONV,
    nn.Conv2d: _CONV,
    nn.GroupNorm: LayerKind(groupnorm_stats, forward_saved=saved_statistics),
    nn.LayerNorm: LayerKind(layernorm_stats, forward_saved=saved_layernorm),
    nn.Embedding: LayerKind(embedding_stats),
    nn.Bilinear: LayerKind(bilinear_stats, all_inputs=True),
}
FALLBACK = LayerKind(fallback_stats, all_inputs=True)
"""Any other module with parameters: torch.func on that module alone, with all its inputs."""


@dataclass(frozen=True)
class Requirements:
    """What a user of the Kronecker factors needs beyond numeric zero padding."""

    ungrouped: bool = False
    """One ``[W|b]`` matrix per layer (GC's rank-1 centers, K-FAC's factors), not per group."""
    all_trainable: bool = False
    """Every parameter of the layer trains (K-FAC preconditions ``[W|b]`` as one matrix)."""


def layer_kind(module: nn.Module) -> LayerKind | None:
    """The table entry of the module's type or its nearest listed base class."""
    for cls in type(module).__mro__:
        if cls in LAYERS:
            return LAYERS[cls]
    return None


def conv_problem(module: nn.Module, grouped_ok: bool = True) -> str | None:
    """Why a convolution cannot be unfolded (``padding='same'`` and padding modes other than
    zeros change the patches), or None."""
    if module.padding_mode != "zeros":
        return f"padding_mode={module.padding_mode!r}"
    if isinstance(module.padding, str):
        return f"padding={module.padding!r}"
    if module.groups != 1 and not grouped_ok:
        return f"groups={module.groups}"
    return None


def stats_kind(module: nn.Module) -> LayerKind:
    """The entry whose handler computes the module's per-example statistics (convolutions
    of every padding mode have one: ``patches.pre_pad``)."""
    kind = layer_kind(module)
    if kind is None or getattr(module, "scale_grad_by_freq", False):
        return FALLBACK
    return kind


def kronecker_kind(module: nn.Module) -> LayerKind | None:
    """The module's entry if its type has Kronecker factors, else None."""
    kind = layer_kind(module)
    return kind if kind is not None and kind.inputs is not None else None


def unsupported(module: nn.Module, needs: Requirements = Requirements()) -> str | None:
    """Why the module has no Kronecker factors that meet ``needs``, or None."""
    kind = kronecker_kind(module)
    if kind is None:
        return f"no Kronecker factors for {type(module).__name__}"
    if needs.all_trainable and not all(p.requires_grad for p in module.parameters(recurse=False)):
        return "a frozen parameter"
    return conv_problem(module, not needs.ungrouped) if kind.conv else None


def kronecker_type_names() -> str:
    """'Linear/Conv1d/Conv2d': the layer types with Kronecker factors, for messages."""
    return "/".join(t.__name__ for t, kind in LAYERS.items() if kind.inputs is not None)


def layers_with_params(model: nn.Module) -> list[nn.Module]:
    """Leaf modules that own trainable parameters directly, in ``model.parameters()`` order."""
    return [m for m in model.modules()
            if any(p.requires_grad for p in m.parameters(recurse=False))]


def kronecker_layers(model: nn.Module) -> list[nn.Module]:
    """Modules with trainable parameters whose type has Kronecker factors (configurations
    not checked: see ``unsupported``)."""
    return [m for m in layers_with_params(model) if kronecker_kind(m) is not None]


def _kronecker(module: nn.Module) -> LayerKind:
    kind = kronecker_kind(module)
    if kind is None:
        raise TypeError(f"no Kronecker factors for {type(module).__name__}")
    return kind


def input_factor(module: nn.Module, a: torch.Tensor, *, ones: bool = False,
                 channels_last: bool = False) -> torch.Tensor:
    """The layer input as ``ã``: (B, K [+1], T), or (B, T, K [+1]) with ``channels_last``;
    ``ones`` appends the bias's constant 1."""
    return _kronecker(module).inputs(module, a, ones=ones, channels_last=channels_last)


def output_factor(module: nn.Module, g: torch.Tensor, *, channels_last: bool = False
                  ) -> torch.Tensor:
    """The output gradient as ``g``: (B, O, T), or (B, T, O) with ``channels_last``."""
    return _kronecker(module).output_grads(g, channels_last=channels_last)
