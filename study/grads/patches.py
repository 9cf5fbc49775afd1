"""Layer inputs and output gradients as the two factors of a per-example weight gradient.

For Linear and Conv layers the per-example gradient of ``[W | b]`` is a sum over positions
t of outer products, ``Σ_t g_t ⊗ ã_t``: ``ã`` is the input (a Conv's unfolded receptive
fields), with a constant 1 appended for the bias, and ``g`` the output gradient. Per-example
statistics, GC's distances and K-FAC's factors all start from these two factors; they differ
only in layout, so every caller gets them from here:
- channels first: ``ã`` (B, K [+1], T), ``g`` (B, O, T), as convolutions lay them out;
- channels last: ``ã`` (B, T, K [+1]), ``g`` (B, T, O), rows of ``[W | b]``'s products.
Conv1d is the Conv2d of height 1. Model: f-dangel/backpack, ``backpack/utils/conv.py``
(``get_weight_gradient_factors``) and ``backpack/utils/linear.py``.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn


class Conv2dGeometry(NamedTuple):
    """Kernel, stride, padding and dilation as (height, width) pairs."""

    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]


def as_conv2d(module: nn.Module, *tensors: torch.Tensor, padded: bool = False
              ) -> tuple[Conv2dGeometry, tuple[torch.Tensor, ...]]:
    """A Conv1d as the Conv2d of height 1 it equals: its geometry as 2-D pairs and its
    (B, C, L) tensors as (B, C, 1, L). A Conv2d comes back unchanged. ``padded``: the input
    is already padded (``pre_pad``), the geometry gets no padding."""
    padding = (0,) * len(module.kernel_size) if padded else tuple(module.padding)
    if len(module.kernel_size) == 1:
        geometry = Conv2dGeometry((1, *module.kernel_size), (1, *module.stride),
                                  (0, *padding), (1, *module.dilation))
        return geometry, tuple(t.unsqueeze(2) for t in tensors)
    geometry = Conv2dGeometry(tuple(module.kernel_size), tuple(module.stride), padding,
                              tuple(module.dilation))
    return geometry, tensors


def pre_pad(module: nn.Module, a: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """The input padded exactly as the module's forward pads it where the geometry cannot
    say it (padding modes other than zeros, ``padding='same'``): ``(padded, True)``;
    otherwise ``(a, False)``. The per-example gradient is then that of a padding-free
    convolution of the padded input, whatever the mode (reflect, replicate, circular)."""
    if module.padding_mode == "zeros" and not isinstance(module.padding, str):
        return a, False
    mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
    return F.pad(a, module._reversed_padding_repeated_twice, mode=mode), True


def unfold(x: torch.Tensor, geometry: Conv2dGeometry, *, ones: bool = False,
           channels_last: bool = False) -> torch.Tensor:
    """Receptive fields of a (B, C, H, W) input in ``F.unfold``'s (channel, kh, kw) order:
    (B, C·kh·kw, T), or (B, T, C·kh·kw) with ``channels_last``; ``ones`` appends a constant 1
    (the bias's input). Built as one strided view of the (padded) input and one copy:
    ``F.unfold``'s CPU im2col loops over examples."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = geometry
    if ph or pw:
        x = F.pad(x, (pw, pw, ph, ph))
    batch, channels, height, width = x.shape
    out_h, out_w = (height - dh * (kh - 1) - 1) // sh + 1, (width - dw * (kw - 1) - 1) // sw + 1
    s_b, s_c, s_h, s_w = x.stride()
    windows = x.as_strided((batch, channels, kh, kw, out_h, out_w),
                           (s_b, s_c, s_h * dh, s_w * dw, s_h * sh, s_w * sw), x.storage_offset())
    features, positions = channels * kh * kw, out_h * out_w
    if not (ones or channels_last):
        return windows.reshape(batch, features, positions)
    if channels_last:
        out = x.new_empty(batch, out_h, out_w, features + ones)
        out[..., :features].view(batch, out_h, out_w, channels, kh, kw).copy_(
            windows.permute(0, 4, 5, 1, 2, 3))
        if ones:
            out[..., features] = 1
        return out.view(batch, positions, features + ones)
    out = x.new_empty(batch, features + 1, positions)
    out[:, :features].view(batch, channels, kh, kw, out_h, out_w).copy_(windows)
    out[:, features] = 1
    return out


def conv_inputs(module: nn.Module, a: torch.Tensor, *, ones: bool = False,
                channels_last: bool = False) -> torch.Tensor:
    """A Conv1d/Conv2d input as ``ã`` (its unfolded patches); see ``unfold``."""
    geometry, (a,) = as_conv2d(module, a)
    return unfold(a, geometry, ones=ones, channels_last=channels_last)


def conv_output_grads(g: torch.Tensor, *, channels_last: bool = False) -> torch.Tensor:
    """A Conv output gradient (B, O, *positions) as (B, O, T), or (B, T, O)."""
    g = g.reshape(g.shape[0], g.shape[1], -1)
    return g.transpose(1, 2) if channels_last else g


def linear_inputs(module: nn.Module, a: torch.Tensor, *, ones: bool = False,
                  channels_last: bool = False) -> torch.Tensor:
    """A Linear input (B, [positions...,] K) as ``ã``; T = 1 for a 2-D input."""
    a = a.reshape(a.shape[0], -1, a.shape[-1])                                   # (B, T, K)
    if not channels_last:
        a = a.transpose(1, 2)
    if not ones:
        return a
    shape = (a.shape[0], a.shape[1], 1) if channels_last else (a.shape[0], 1, a.shape[2])
    return torch.cat([a, a.new_ones(shape)], dim=2 if channels_last else 1)


def linear_output_grads(g: torch.Tensor, *, channels_last: bool = False) -> torch.Tensor:
    """A Linear output gradient (B, [positions...,] O) as (B, O, T), or (B, T, O)."""
    g = g.reshape(g.shape[0], -1, g.shape[-1])
    return g if channels_last else g.transpose(1, 2)
