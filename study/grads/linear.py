"""nn.Linear and nn.Bilinear: the Goodfellow / BackPACK factorized forms.

For a 2-D input the per-example weight gradient is the outer product g_n a_nᵀ, so
Σ_n g_n² ⊗ a_n² = (G∘G)ᵀ(A∘A) is one matmul of the weight's size, and
||g_n a_nᵀ||² = ||g_n||²·||a_n||². Inputs with extra leading dimensions (B, T, d) sum the
outer products over positions, which does not factorize: they go through the materialized
per-example form shared with convolutions.

nn.Bilinear (two inputs x1, x2) is the Linear of the outer product x1 ⊗ x2 (its weight
(O, I, J) flattened to (O, I·J)): the same forms with a = x1 ⊗ x2, whose squares and norms
factorize again (a² = x1² ⊗ x2², ||a||² = ||x1||²·||x2||²). The generic torch.func fallback
has no batching rule for the bilinear product (``aten::_trilinear``) and runs it example by
example: tens of times slower.
"""
from __future__ import annotations

import torch
from torch import nn

from study.grads.layer import LayerStats, positions_stats, record_materialized, wants


def linear_stats(module: nn.Linear, a: torch.Tensor, g: torch.Tensor,
                 wanted: list[torch.Tensor], norms: bool,
                 second_moment: bool = True) -> LayerStats:
    out = LayerStats()
    batch = a.shape[0]
    a = a.reshape(batch, -1, a.shape[-1])      # (B, T, K)
    g = g.reshape(batch, -1, g.shape[-1])      # (B, T, O)
    if a.shape[1] == 1:
        _flat(out, module.weight, module.bias, a[:, 0], g[:, 0], wanted, norms, second_moment)
    else:
        _positions(out, module.weight, module.bias, a, g, wanted, norms, second_moment)
    return out


def _positions(out: LayerStats, weight: torch.Tensor, bias: torch.Tensor | None,
               a: torch.Tensor, g: torch.Tensor, wanted: list[torch.Tensor], norms: bool,
               second_moment: bool) -> None:
    """a (B, T, K), g (B, T, O): the per-example gradient sums T outer products."""
    if wants(wanted, weight):
        positions_stats(out, weight, g.transpose(1, 2), a.transpose(1, 2), norms, second_moment)
    if wants(wanted, bias):
        record_materialized(out, bias, g.sum(1), norms, second_moment)


def bilinear_stats(module: nn.Bilinear, a: torch.Tensor, g: torch.Tensor,
                   wanted: list[torch.Tensor], norms: bool, second_moment: bool = True,
                   inputs: tuple = (), kwargs: dict | None = None) -> LayerStats:
    """``inputs``: the forward's (input1, input2); ``a`` is input1."""
    x1, x2 = (*inputs, *(kwargs or {}).values())[:2]
    batch = x1.shape[0]
    outer = (x1.unsqueeze(-1) * x2.unsqueeze(-2)).reshape(batch, -1, x1.shape[-1] * x2.shape[-1])
    g = g.reshape(batch, -1, g.shape[-1])
    out = LayerStats()
    if outer.shape[1] == 1:
        _flat(out, module.weight, module.bias, outer[:, 0], g[:, 0], wanted, norms,
              second_moment, factors=(x1.reshape(batch, -1), x2.reshape(batch, -1)))
    else:
        _positions(out, module.weight, module.bias, outer, g, wanted, norms, second_moment)
    return out


def _flat(out: LayerStats, weight: torch.Tensor, bias: torch.Tensor | None, a: torch.Tensor,
          g: torch.Tensor, wanted: list[torch.Tensor], norms: bool, second_moment: bool,
          factors: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
    """``factors``: a is their outer product (Bilinear); its squares come from theirs."""
    want_w, want_b = wants(wanted, weight), wants(wanted, bias)
    need_sq = second_moment or norms
    g2 = g * g if need_sq else None
    if want_w:
        out.sums[weight] = torch.mm(g.t(), a).view(weight.shape)
    if want_b:
        out.sums[bias] = g.sum(0)
    if not need_sq:
        return
    a2 = a * a if want_w else None
    if second_moment:
        if want_w:
            out.sum_sqs[weight] = torch.mm(g2.t(), a2).view(weight.shape)
        if want_b:
            out.sum_sqs[bias] = g2.sum(0)
    if norms:
        # ||g_n a_nᵀ||² + ||g_n||² = ||g_n||²·(||a_n||² + 1) with a bias
        g_norms = g2.sum(1)
        if want_w:
            a_norms = a2.sum(1) if factors is None else \
                factors[0].pow(2).sum(1) * factors[1].pow(2).sum(1)
            out.add_norms(g_norms * (a_norms + 1) if want_b else g_norms * a_norms)
        else:
            out.add_norms(g_norms)
