"""Any other module with parameters (custom layers, modules with several inputs such as
``nn.Bilinear``): per-example gradients of that module alone with torch.func.

Given the module's inputs (all of them, positional and keyword, recorded during the
engine's single forward) and the gradient g_n of the loss with respect to its output, the
per-example parameter gradient is the vector-Jacobian product of ``module(inputs_n)`` with
g_n. ``vmap(vjp(...))`` computes all of them at once by re-running only this module's
forward and its backward to the parameters (the pullback of g_n itself: ``grad`` of
``(out * g_n).sum()`` would add a product with g_n and its backward, 15% of the time on a
conv), so the rest of the network is never differentiated per example. The cost above the
plain step is torch.func's on this module alone plus one forward of it. Tensor inputs whose
first dimension is the batch are split per example; other inputs (and non-tensors) are
passed whole to every example. The per-example gradients are materialized a chunk of the
batch at a time (``layer.MATERIALIZE_BUDGET``) and squared in place.

The module must return one tensor and treat examples independently (no BatchNorm in train
mode). Layers with a closed form (Linear, Bilinear, Conv, GroupNorm, LayerNorm, Embedding) never
come here: see ``layer_types.LAYERS``.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call, grad_and_value, vjp, vmap

from study.grads.layer import LayerStats, batch_chunks, record_parts


def fallback_stats(module: nn.Module, a: torch.Tensor, g: torch.Tensor,
                   wanted: list[torch.Tensor], norms: bool, second_moment: bool = True,
                   inputs: tuple | None = None, kwargs: dict | None = None) -> LayerStats:
    """``inputs``/``kwargs``: every input of the module's forward (default: ``(a,)``)."""
    inputs = (a,) if inputs is None else tuple(inputs)
    kwargs = dict(kwargs or {})
    batch = g.shape[0]
    names = {p: n for n, p in module.named_parameters(recurse=False)}
    chosen = {names[p]: p.detach() for p in wanted}
    split_args = [i for i, t in enumerate(inputs) if _per_example(t, batch)]
    split_kwargs = [k for k, t in kwargs.items() if _per_example(t, batch)]
    if not split_args and not split_kwargs:
        raise NotImplementedError(f"batch_stats: {type(module).__name__} has no input with "
                                  f"the batch ({batch}) as first dimension; cannot split its "
                                  "gradient per example")

    def one_example(params, args_n, kwargs_n, g_n):
        args, kw = list(inputs), dict(kwargs)
        for i, t in zip(split_args, args_n):
            args[i] = t.unsqueeze(0)
        for k, t in zip(split_kwargs, kwargs_n):
            kw[k] = t.unsqueeze(0)
        _, pullback = vjp(lambda p: functional_call(module, p, tuple(args), kw), params)
        return pullback(g_n.unsqueeze(0))[0]

    per_example = vmap(one_example, in_dims=(None, 0, 0, 0))
    parts: dict[str, list[torch.Tensor]] = {name: [] for name in chosen}
    for sl in batch_chunks(batch, sum(p.numel() for p in chosen.values())):
        got = per_example(chosen, [inputs[i][sl] for i in split_args],
                          [kwargs[k][sl] for k in split_kwargs], g[sl])
        for name in chosen:
            parts[name].append(got[name].contiguous().view(sl.stop - sl.start, -1))
    out = LayerStats()
    for name, p in zip(chosen, wanted):
        record_parts(out, p, parts[name], norms, second_moment, inplace=True)
    return out


def _per_example(value, batch: int) -> bool:
    return isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == batch


def whole_model_stats(model: nn.Module, loss_fn, x: torch.Tensor, y: torch.Tensor,
                      params: list[torch.Tensor], norms: bool, second_moment: bool):
    """When no parameterized module has a closed form, torch.func over the whole model
    (``vmap(grad)`` of each example's loss) is cheaper than the engine's forward + backward
    followed by each module's own ``vmap(vjp)`` (which re-runs every module's forward): this
    is exactly torch.func alone, chunked over the batch. Returns (mean loss, sums, sum_sqs,
    norms_sq) in the order of ``params``."""
    names = {p: n for n, p in model.named_parameters()}
    chosen = {names[p]: p.detach() for p in params}

    def one_loss(values, x_n, y_n):
        # one example: per-example, mean-reduced and sum-reduced losses are all the same
        return loss_fn(functional_call(model, values, (x_n.unsqueeze(0),)),
                       y_n.unsqueeze(0)).sum()

    per_example = vmap(grad_and_value(one_loss), in_dims=(None, 0, 0))
    batch = x.shape[0]
    parts: dict[str, list[torch.Tensor]] = {name: [] for name in chosen}
    losses = []
    for sl in batch_chunks(batch, sum(p.numel() for p in params)):
        grads, values = per_example(chosen, x[sl], y[sl])
        losses.append(values.detach())
        for name in chosen:
            parts[name].append(grads[name].contiguous().view(sl.stop - sl.start, -1))
    out = LayerStats()
    for name, p in zip(chosen, params):
        record_parts(out, p, parts[name], norms, second_moment, inplace=True)
    return (float(torch.cat(losses).mean()), [out.sums[p] for p in params],
            [out.sum_sqs[p] for p in params] if second_moment else None, out.norms_sq)
