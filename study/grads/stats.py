"""Per-example gradient statistics from ONE forward and ONE backward pass.

``batch_stats`` runs the model once, backpropagates the summed per-example loss once, and
asks autograd for the gradient with respect to each parameterized layer's *output* (not its
parameters): autograd then skips every weight-gradient product, and each layer's handler
computes the sum, the elementwise second moment and the per-example norms from the layer's
input ``a`` (recorded by ``study.grads.capture``) and that output gradient ``g``. The
weight-gradient sum therefore costs what the plain backward would have spent on it, and
the statistics add only their own products (Linear: one more matmul of the weight's size).

Handlers, one module per layer type (BackPACK style), looked up in ``layer_types.LAYERS``:
``linear`` (factorized; Bilinear as the Linear of x1⊗x2), ``conv`` (unfold + batched
matmul, any padding mode), ``norm`` (GroupNorm and LayerNorm, closed form), ``embedding``
(coalesced rows, never a dense vocabulary-sized gradient per example), ``fallback``
(torch.func on that module alone, with all its inputs: custom layers; when no module has a
closed form, torch.func over the whole model instead, which then costs less).
Examples must be independent through the network (no train-mode BatchNorm), and each
parameterized module must run once per forward (no weight sharing across calls).
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from study.grads.capture import Capture, capture
from study.grads.fallback import fallback_stats, whole_model_stats
from study.grads.layer_types import stats_kind

REDUCTIONS = ("none", "mean", "sum")


@dataclass
class BatchStats:
    """Statistics of the per-example gradients g_n (of loss_n itself, not loss_n / B).

    ``sum``/``sum_sq`` hold one tensor per parameter, in the order of ``params``;
    ``norms_sq`` is ||g_n||² over all those parameters (None when not requested).
    """

    loss: float
    n: int
    sum: list[torch.Tensor]
    sum_sq: list[torch.Tensor] | None
    norms_sq: torch.Tensor | None

    def mean(self) -> list[torch.Tensor]:
        return [s / self.n for s in self.sum]

    def var(self) -> list[torch.Tensor]:
        """Population variance (ddof=0), clamped at 0 against rounding."""
        if self.sum_sq is None:
            raise ValueError("var() needs the second moment; call batch_stats with "
                             "second_moment=True")
        out = []
        for s, q in zip(self.sum, self.sum_sq):
            mean = s / self.n
            out.append((q / self.n).addcmul_(mean, mean, value=-1).clamp_(min=0))
        return out


def batch_stats(model: nn.Module, loss_fn: Callable, batch, params: Iterable[torch.Tensor]
                | None = None, reduction: str = "none", norms: bool = True, *,
                second_moment: bool = True) -> BatchStats:
    """Sum, sum of squares and squared norms of the per-example gradients on ``batch``.

    ``batch`` is a ``Batch`` (``.x``, ``.y``) or an ``(x, y)`` pair. ``loss_fn(logits, y)``
    returns per-example losses; if it returns a reduced scalar, ``reduction`` says whether it
    is the mean or the sum so the engine can undo it. ``p.grad`` is never touched.
    ``second_moment=False`` skips ``sum_sq`` (and lets convolutions use the Gram form for
    the norms where it is cheaper).
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction: {reduction!r} is not one of {list(REDUCTIONS)}")
    x, y = (batch.x, batch.y) if hasattr(batch, "x") else batch
    params = [p for p in model.parameters() if p.requires_grad] if params is None \
        else list(params)
    owners = _owners(model, params)
    if owners and all(stats_kind(m).stats is fallback_stats for m in owners):
        loss, sums, sum_sq, norms_sq = whole_model_stats(model, loss_fn, x, y, params, norms,
                                                         second_moment)
        return BatchStats(loss, x.shape[0], sums, sum_sq, norms_sq if norms else None)
    with capture(model, list(owners), output_grads=False, keep_outputs=True) as cap:
        raw = loss_fn(model(x), y)
    n = x.shape[0]
    total, loss = _total(raw, reduction, n)

    live = _live_outputs(cap, owners)
    kinds = {m: stats_kind(m) for m in live}
    saved = {m: kinds[m].forward_saved(m, cap.records[m].output, n) for m in live
             if kinds[m].forward_saved is not None}   # read before the backward frees them
    grads = torch.autograd.grad(total, [cap.records[m].output for m in live], allow_unused=True)
    results: dict[torch.Tensor, tuple[torch.Tensor, torch.Tensor | None]] = {}
    norms_sq = None
    with torch.no_grad():
        for m, g in zip(live, grads):
            if g is None:
                continue
            handler = kinds[m].stats
            if m in saved:
                handler = partial(handler, saved=saved[m])
            if kinds[m].all_inputs:
                handler = partial(handler, inputs=cap.records[m].inputs,
                                  kwargs=cap.records[m].kwargs)
            layer = handler(m, cap.records[m].a, g, owners[m], norms, second_moment)
            for p in owners[m]:
                results[p] = (layer.sums[p], layer.sum_sqs.get(p))
            if norms and layer.norms_sq is not None:
                norms_sq = layer.norms_sq if norms_sq is None else norms_sq + layer.norms_sq
        if norms and norms_sq is None:
            norms_sq = x.new_zeros(n)
    sums = [results[p][0] if p in results else torch.zeros_like(p) for p in params]
    sum_sq = [results[p][1] if p in results else torch.zeros_like(p) for p in params] \
        if second_moment else None
    return BatchStats(loss, n, sums, sum_sq, norms_sq if norms else None)


def _owners(model: nn.Module, params: list[torch.Tensor]) -> dict[nn.Module, list[torch.Tensor]]:
    """The module that directly owns each wanted parameter, with its wanted parameters."""
    owner_of: dict[torch.Tensor, nn.Module] = {}
    for m in model.modules():
        for p in m.parameters(recurse=False):
            if p in owner_of and owner_of[p] is not m:
                raise NotImplementedError("batch_stats: a parameter shared by two modules is "
                                          "not supported (per-example sums would be split)")
            owner_of[p] = m
    owners: dict[nn.Module, list[torch.Tensor]] = {}
    for i, p in enumerate(params):
        if p not in owner_of:
            raise ValueError(f"params: entry {i} (shape {tuple(p.shape)}) is not a parameter "
                             "of the model")
        owners.setdefault(owner_of[p], []).append(p)
    return owners


def _total(raw: torch.Tensor, reduction: str, n: int) -> tuple[torch.Tensor, float]:
    """The scalar whose gradient is Σ_n ∇loss_n, and the mean loss."""
    if not raw.requires_grad:
        raise ValueError("loss_fn: the loss does not depend on any trainable parameter "
                         "(called under torch.no_grad()?)")
    if raw.dim() == 1 and raw.shape[0] == n:
        return raw.sum(), float(raw.detach().mean())
    if raw.dim() != 0:
        raise ValueError(f"loss_fn: expected per-example losses of shape ({n},) or a scalar, "
                         f"got shape {tuple(raw.shape)}")
    if reduction == "none":
        raise ValueError("loss_fn returned a scalar but reduction='none'; pass "
                         "reduction='mean' or 'sum' to say how it was reduced")
    value = float(raw.detach())
    return (raw * n, value) if reduction == "mean" else (raw, value / n)


def _live_outputs(cap: Capture, owners) -> list[nn.Module]:
    """The owners whose output depends on the parameters: the tensors to differentiate
    with respect to. Each must come from one call and be unchanged since."""
    live = []
    for m in owners:
        rec = cap.records[m]
        if rec.output is None or not rec.output.requires_grad:
            continue
        name = type(m).__name__
        if rec.calls != 1:
            raise NotImplementedError(f"batch_stats: {name} ran {rec.calls} times in one "
                                      "forward; per-example statistics need one call")
        if rec.modified_in_place():
            raise ValueError(f"batch_stats: the output of {name} was modified in place "
                             "(e.g. ReLU(inplace=True)); use out-of-place operations")
        live.append(m)
    return live
