"""nn.GroupNorm affine parameters in closed form.

GroupNorm normalizes each example on its own, so with x̂ = group_norm(a) (no affine) the
per-example gradients are Σ_positions g∘x̂ (weight) and Σ_positions g (bias), (B, C) each:
one normalization forward, one product and two reductions, instead of the generic
torch.func fallback's per-example autograd (much slower for GroupNorm on CPU). Measured
here for (128, 16, 32, 32): group_norm 0.65 ms + product-sum 1.2 ms, whereas forming the
group statistics with var_mean alone takes 10 ms.
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
    batch, channels = a.shape[:2]
    g = g.reshape(batch, channels, -1)
    if wants(wanted, module.weight):
        normalized = F.group_norm(a, module.num_groups, eps=module.eps)
        per = (g * normalized.view(batch, channels, -1)).sum(2)
        record_materialized(out, module.weight, per, norms, second_moment)
    if wants(wanted, module.bias):
        record_materialized(out, module.bias, g.sum(2), norms, second_moment)
    return out
