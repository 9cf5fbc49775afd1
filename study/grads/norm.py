"""nn.GroupNorm affine parameters in closed form.

GroupNorm normalizes each example on its own, so with x̂ = group_norm(a) (no affine) the
per-example gradients are Σ_positions g∘x̂ (weight) and Σ_positions g (bias): (B, C) each,
one normalization forward instead of the generic torch.func fallback's per-example
forward+backward (which vmap runs much slower for GroupNorm on CPU).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from study.grads.layer import LayerStats, record_materialized, wants


def groupnorm_stats(module: nn.GroupNorm, a: torch.Tensor, g: torch.Tensor,
                    wanted: list[torch.Tensor], norms: bool,
                    second_moment: bool = True) -> LayerStats:
    out = LayerStats()
    spatial = tuple(range(2, g.dim()))
    if wants(wanted, module.weight):
        normalized = F.group_norm(a, module.num_groups, eps=module.eps)
        per = (g * normalized).sum(spatial) if spatial else g * normalized
        record_materialized(out, module.weight, per, norms, second_moment)
    if wants(wanted, module.bias):
        per = g.sum(spatial) if spatial else g
        record_materialized(out, module.bias, per, norms, second_moment)
    return out
