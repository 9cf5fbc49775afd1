"""nn.Conv1d / nn.Conv2d: per-example weight gradients, materialized.

The unfolded input A_n (Cin·k, T) and the output gradient G_n (Cout, T) give the per-example
weight gradient G_n A_nᵀ (per group). Its elementwise square does not factorize, so the
second moment needs it materialized: the multiply-adds of the weight-gradient backward it
replaces, plus a square and two reductions. Two ways to materialize it:
- with ≥ GROUPED_MIN_CHANNELS input channels per group: one weight-gradient convolution with
  the batch folded into the groups (no unfolded copy of the input);
- otherwise: F.unfold + one batched matmul (the unfolded copy is small for few channels).

Cost estimate that picks the form per layer (multiply-adds, B examples, per group O×K
weights, T output positions):
- materialize: B·O·K·T (bmm) + 2·B·O·K (square, reductions) -> sum, second moment, norms;
- Gram (norms only, BackPACK ``batch_l2_grad``/Opacus ghost norms): O·K·B·T for the sum plus
  B·T²·(O+K+1) for the two T×T Gram matrices and their product.
Gram wins only when T²·(O+K+1) < 2·O·K (few positions, wide layers) and the second moment is
not wanted; with the second moment (the default) the materialized form is always needed.
Conv1d is treated as Conv2d with height 1; 1×1 convolutions without padding skip the unfold.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from study.grads.layer import LayerStats, batch_chunks, positions_stats, record_materialized, wants

# Channels per group from which the batch-folded grouped weight-gradient beats unfold + bmm.
# Measured here (CPU, B=128): the unfolded copy dominates for wide inputs (ResNet-8 block 1:
# unfold+bmm 147 ms vs grouped 17 ms) while oneDNN's grouped kernel is slow for 1-3 input
# channels (LeNet conv1: unfold+bmm 3 ms vs grouped 19 ms).
GROUPED_MIN_CHANNELS = 8


def conv_supported(module: nn.Module) -> bool:
    """Zero padding given as numbers (``padding='same'`` or other modes use the fallback)."""
    return (isinstance(module, (nn.Conv1d, nn.Conv2d)) and module.padding_mode == "zeros"
            and not isinstance(module.padding, str))


def conv_plan(batch: int, out_per_group: int, in_per_group: int, positions: int,
              second_moment: bool) -> str:
    """'materialize' or 'gram' by the multiply-add estimate in the module docstring."""
    if second_moment:
        return "materialize"
    o, k, t = out_per_group, in_per_group, positions
    materialize = batch * o * k * t + 2 * batch * o * k
    gram = batch * o * k * t + batch * t * t * (o + k + 1)
    return "gram" if gram < materialize else "materialize"


def conv_stats(module: nn.Module, a: torch.Tensor, g: torch.Tensor,
               wanted: list[torch.Tensor], norms: bool, second_moment: bool = True,
               plan: str | None = None) -> LayerStats:
    out = LayerStats()
    if isinstance(module, nn.Conv1d):
        a, g = a.unsqueeze(2), g.unsqueeze(2)
        kernel, stride = (1, *module.kernel_size), (1, *module.stride)
        padding, dilation = (0, *module.padding), (1, *module.dilation)
    else:
        kernel, stride = module.kernel_size, module.stride
        padding, dilation = module.padding, module.dilation
    batch, cout, groups = g.shape[0], g.shape[1], module.groups
    positions = g.shape[2] * g.shape[3]
    if wants(wanted, module.weight):
        in_per_group = module.weight.shape[1]
        plan = plan or conv_plan(batch, cout // groups, module.weight[0].numel(), positions,
                                 second_moment)
        if plan == "materialize" and in_per_group >= GROUPED_MIN_CHANNELS:
            _grouped(out, module.weight, a, g, kernel, stride, padding, dilation, groups,
                     norms, second_moment)
        else:
            cols = _unfold(a, kernel, stride, padding, dilation)      # (B, Cin·k, T)
            cols = cols.view(batch, groups, -1, positions)
            gg = g.reshape(batch, groups, cout // groups, positions)
            if plan == "materialize":
                positions_stats(out, module.weight, gg, cols, norms, second_moment)
            elif second_moment:
                raise ValueError("conv_stats: the Gram plan gives norms only, not the "
                                 "second moment")
            else:
                _gram(out, module.weight, gg, cols, norms)
    if wants(wanted, module.bias):
        record_materialized(out, module.bias, g.sum((2, 3)), norms, second_moment)
    return out


def _grouped(out: LayerStats, weight: torch.Tensor, a: torch.Tensor, g: torch.Tensor, kernel,
             stride, padding, dilation, groups: int, norms: bool, second_moment: bool) -> None:
    """Per-example weight gradients as ONE convolution weight-gradient with the batch folded
    into the groups: input (1, B·Cin, H, W), output gradient (1, B·Cout, H', W'), groups
    B·groups -> (B·Cout, Cin/groups, k...) = the B per-example gradients, by the same
    (oneDNN) kernel as the plain backward, without an unfolded copy of the input."""
    batch = a.shape[0]
    parts = []
    for sl in batch_chunks(batch, weight.numel()):
        n = sl.stop - sl.start
        shape = (n * weight.shape[0], weight.shape[1], *kernel)
        per = torch.ops.aten.convolution_backward(
            g[sl].reshape(1, -1, *g.shape[2:]), a[sl].reshape(1, -1, *a.shape[2:]),
            weight.new_empty(shape), None, list(stride), list(padding), list(dilation), False,
            [0] * len(stride), n * groups, [False, True, False])[1]
        parts.append(per.view(n, -1))
    per = parts[0] if len(parts) == 1 else torch.cat(parts)
    record_materialized(out, weight, per, norms, second_moment)


def _unfold(a: torch.Tensor, kernel, stride, padding, dilation) -> torch.Tensor:
    if tuple(kernel) == (1, 1) and tuple(padding) == (0, 0):
        a = a[:, :, ::stride[0], ::stride[1]]
        return a.reshape(a.shape[0], a.shape[1], -1)
    return F.unfold(a, kernel, dilation=dilation, padding=padding, stride=stride)


def _gram(out: LayerStats, weight: torch.Tensor, g: torch.Tensor, cols: torch.Tensor,
          norms: bool) -> None:
    """Sum as one contraction over (examples, positions); norms Σ_{s,t}(g_s·g_t)(a_s·a_t)."""
    out.sums[weight] = torch.einsum("bgot,bgkt->gok", g, cols).reshape(weight.shape)
    if norms:
        gram_g = torch.matmul(g.transpose(-1, -2), g)
        gram_a = torch.matmul(cols.transpose(-1, -2), cols)
        out.add_norms((gram_g * gram_a).sum((1, 2, 3)))
