"""nn.Conv1d / nn.Conv2d: per-example weight gradients, materialized.

The unfolded input A_n (Cin·k, T) and the output gradient G_n (Cout, T) give the per-example
weight gradient G_n A_nᵀ (per group). Its elementwise square does not factorize, so the
second moment needs it materialized: the multiply-adds of the weight-gradient backward it
replaces, plus a square and two reductions. Two ways to materialize it:
- many channels and positions: one weight-gradient convolution with the batch folded into
  the groups (no unfolded copy of the input);
- otherwise: unfold + batched matmul, a few examples at a time, so the unfolded copy stays
  in cache (the grouped convolution is slow for few positions or few channels).

Cost estimate that picks the form per layer (multiply-adds, B examples, per group O×K
weights, T output positions):
- materialize: B·O·K·T (bmm) + 2·B·O·K (square, reductions) -> sum, second moment, norms;
- Gram (norms only, BackPACK ``batch_l2_grad``/Opacus ghost norms): O·K·B·T for the sum plus
  B·T²·(O+K+1) for the two T×T Gram matrices and their product.
Gram wins only when T²·(O+K+1) < 2·O·K (few positions, wide layers) and the second moment is
not wanted; with the second moment (the default) the materialized form is always needed.
Conv1d is treated as Conv2d with height 1 (``patches.as_conv2d``, ``patches.unfold``).
Padding modes other than zeros (reflect, replicate, circular) and ``padding='same'`` pad
the input as the module's forward does (``patches.pre_pad``), then unfold without padding
(BackPACK and Opacus unfold with zeros whatever the mode: wrong for those).
"""
from __future__ import annotations

import torch
from torch import nn

from study.grads.layer import LayerStats, batch_chunks, positions_stats, record_materialized, wants
from study.grads.patches import Conv2dGeometry, as_conv2d, pre_pad, unfold

GROUPED_MIN_CHANNELS = 8
GROUPED_MIN_POSITIONS = 128
"""The batch-folded grouped convolution matches the plain weight gradient only with many
input channels per group and many output positions; otherwise unfold + batched matmul."""
UNFOLD_CHUNK = 2 ** 19
"""Elements of unfolded input per batched matmul (2 MiB in float32)."""


def _grouped_is_faster(in_per_group: int, positions: int) -> bool:
    return in_per_group >= GROUPED_MIN_CHANNELS and positions >= GROUPED_MIN_POSITIONS


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
    """Any padding (other modes and ``'same'`` are applied to ``a`` first: ``pre_pad``);
    ``plan`` forces one."""
    out = LayerStats()
    a, padded = pre_pad(module, a)
    geometry, (a, g) = as_conv2d(module, a, g, padded=padded)
    batch, cout, groups = g.shape[0], g.shape[1], module.groups
    positions = g.shape[2] * g.shape[3]
    if wants(wanted, module.weight):
        in_per_group = module.weight.shape[1]
        plan = plan or conv_plan(batch, cout // groups, module.weight[0].numel(), positions,
                                 second_moment)
        if plan == "materialize" and _grouped_is_faster(in_per_group, positions):
            _grouped(out, module.weight, a, g, geometry, groups, norms, second_moment)
        else:
            gg = g.reshape(batch, groups, cout // groups, positions)

            def cols(sl: slice) -> torch.Tensor:                      # (n, groups, K, T)
                unfolded = unfold(a[sl], geometry)
                return unfolded.view(unfolded.shape[0], groups, -1, positions)

            if plan == "materialize":
                per_product = max(1, UNFOLD_CHUNK // (module.weight[0].numel() * groups
                                                      * positions))
                positions_stats(out, module.weight, gg, cols, norms, second_moment,
                                examples_per_product=per_product)
            elif second_moment:
                raise ValueError("conv_stats: the Gram plan gives norms only, not the "
                                 "second moment")
            else:
                _gram(out, module.weight, gg, cols(slice(None)), norms)
    if wants(wanted, module.bias):
        record_materialized(out, module.bias, g.sum((2, 3)), norms, second_moment)
    return out


def _grouped(out: LayerStats, weight: torch.Tensor, a: torch.Tensor, g: torch.Tensor,
             geometry: Conv2dGeometry, groups: int, norms: bool, second_moment: bool) -> None:
    """Per-example weight gradients as ONE convolution weight-gradient with the batch folded
    into the groups: input (1, B·Cin, H, W), output gradient (1, B·Cout, H', W'), groups
    B·groups -> (B·Cout, Cin/groups, k...) = the B per-example gradients, by the same
    (oneDNN) kernel as the plain backward, without an unfolded copy of the input."""
    kernel, stride, padding, dilation = geometry
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


def _gram(out: LayerStats, weight: torch.Tensor, g: torch.Tensor, cols: torch.Tensor,
          norms: bool) -> None:
    """Sum as one contraction over (examples, positions); norms Σ_{s,t}(g_s·g_t)(a_s·a_t)."""
    out.sums[weight] = torch.einsum("bgot,bgkt->gok", g, cols).reshape(weight.shape)
    if norms:
        gram_g = torch.matmul(g.transpose(-1, -2), g)
        gram_a = torch.matmul(cols.transpose(-1, -2), cols)
        out.add_norms((gram_g * gram_a).sum((1, 2, 3)))
