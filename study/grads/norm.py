"""nn.GroupNorm and nn.LayerNorm affine parameters in closed form.

GroupNorm normalizes each example on its own: x̂ = (a − μ)·r with the mean μ and inverse
std r of each (example, group). The per-example gradients are Σ_positions g∘x̂ (weight)
and Σ_positions g (bias), (B, C) each, and Σ g∘x̂ = r·(Σ g∘a − μ·Σ g) — the same form as
PyTorch's own GroupNorm backward. μ and r are read from the forward's autograd node when it
saved them (free); otherwise x̂ is recomputed with one group_norm (much cheaper than
recomputing μ and r with var_mean). Either way no per-example autograd (the generic
torch.func fallback is much slower here).

LayerNorm normalizes each position of each example over its last dims: the per-example
gradients are Σ_positions g∘x̂ and Σ_positions g, (B, *normalized_shape), with x̂ from the
forward's saved mean and rstd (``NativeLayerNormBackward0``) or one ``layer_norm``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from study.grads.layer import LayerStats, record_materialized, wants


def groupnorm_stats(module: nn.GroupNorm, a: torch.Tensor, g: torch.Tensor,
                    wanted: list[torch.Tensor], norms: bool, second_moment: bool = True,
                    saved: tuple[torch.Tensor, torch.Tensor] | None = None) -> LayerStats:
    """``saved``: the forward's (mean, rstd) from ``saved_statistics`` (read before the
    backward frees them), or None to recompute the normalization."""
    out = LayerStats()
    batch, channels = a.shape[:2]
    g = g.reshape(batch, channels, -1)
    g_sum = g.sum(2)
    if wants(wanted, module.weight):
        if saved is None:
            normalized = F.group_norm(a, module.num_groups, eps=module.eps)
            per = (g * normalized.view(batch, channels, -1)).sum(2)
        else:
            per_group = channels // module.num_groups
            mean, rstd = (t.repeat_interleave(per_group, dim=1) for t in saved)
            per = ((g * a.reshape(batch, channels, -1)).sum(2) - mean * g_sum) * rstd
        record_materialized(out, module.weight, per, norms, second_moment)
    if wants(wanted, module.bias):
        record_materialized(out, module.bias, g_sum, norms, second_moment)
    return out


def saved_statistics(module: nn.GroupNorm, output: torch.Tensor | None, batch: int):
    """(mean, rstd), each (B, groups), saved by the forward's NativeGroupNormBackward0;
    None when unavailable. Must be called before the backward pass frees them."""
    return _saved_mean_rstd(output, "NativeGroupNormBackward0", (batch, module.num_groups))


def _saved_mean_rstd(output: torch.Tensor | None, node_name: str, shape: tuple[int, ...]):
    """The forward node's saved (mean, rstd) in the output's dtype, if both have ``shape``."""
    node = getattr(output, "grad_fn", None)
    if node is None or type(node).__name__ != node_name:
        return None
    try:
        mean, rstd = node._saved_result1, node._saved_result2
    except (AttributeError, RuntimeError):
        return None
    if mean.shape != shape or rstd.shape != shape:
        return None
    return mean.to(output.dtype), rstd.to(output.dtype)


def layernorm_stats(module: nn.LayerNorm, a: torch.Tensor, g: torch.Tensor,
                    wanted: list[torch.Tensor], norms: bool, second_moment: bool = True,
                    saved: tuple[torch.Tensor, torch.Tensor] | None = None) -> LayerStats:
    """``saved``: the forward's (mean, rstd) from ``saved_layernorm``, or None."""
    out = LayerStats()
    batch, shape = a.shape[0], tuple(module.normalized_shape)
    g = g.reshape(batch, -1, *shape)
    if wants(wanted, module.weight):
        if saved is None:
            normalized = F.layer_norm(a, shape, eps=module.eps)
        else:
            mean, rstd = saved
            normalized = (a - mean) * rstd
        per = (g * normalized.reshape(g.shape)).sum(1)
        record_materialized(out, module.weight, per, norms, second_moment)
    if wants(wanted, module.bias):
        record_materialized(out, module.bias, g.sum(1), norms, second_moment)
    return out


def saved_layernorm(module: nn.LayerNorm, output: torch.Tensor | None, batch: int):
    """(mean, rstd) saved by the forward's NativeLayerNormBackward0, shaped to broadcast
    against the input; None when unavailable. Call before the backward frees them."""
    if output is None or output.shape[0] != batch:
        return None
    kept = output.dim() - len(module.normalized_shape)
    shape = (*output.shape[:kept], *(1,) * len(module.normalized_shape))
    return _saved_mean_rstd(output, "NativeLayerNormBackward0", shape)
