"""Any other module with parameters (GroupNorm/LayerNorm affine, embeddings, custom layers):
per-example gradients of that module alone with torch.func.

Given the module's input a_n and the gradient g_n of the loss with respect to its output
(both recorded during the engine's single forward+backward), the per-example parameter
gradient is the vector-Jacobian product of ``module(a_n)`` with g_n. ``vmap(grad(...))``
computes all of them at once by re-running only this module's forward and backward, so the
rest of the network is never differentiated per example. The module must map one input
tensor to one output tensor independently per example (no BatchNorm in train mode).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from study.grads.layer import LayerStats, record_materialized


def fallback_stats(module: nn.Module, a: torch.Tensor, g: torch.Tensor,
                   wanted: list[torch.Tensor], norms: bool,
                   second_moment: bool = True) -> LayerStats:
    names = {p: n for n, p in module.named_parameters(recurse=False)}
    chosen = {names[p]: p.detach() for p in wanted}

    def contribution(params, a_n, g_n):
        out = functional_call(module, params, (a_n.unsqueeze(0),))
        return (out * g_n.unsqueeze(0)).sum()

    per_example = vmap(grad(contribution), in_dims=(None, 0, 0))(chosen, a, g)
    out = LayerStats()
    for name, p in zip(chosen, wanted):
        record_materialized(out, p, per_example[name], norms, second_moment)
    return out
