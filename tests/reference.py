"""The shared test references, defined once (BackPACK keeps one autograd reference for all
quantities): per-example losses and gradients by a loop over examples, one forward and one
backward each, and the gradients every estimator is checked against built from that loop.

They are naive on purpose and use nothing from ``study``. They compute in the model's
dtype: tests that compare to ~1e-9 build float64 models and data, which makes the loop the
known truth for every per-example estimator (batch_stats, SNR, GC's factors, the variance
probe) and, averaged, for the full gradient (SVRG, GC's stratified estimate)."""
from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from study.data import DataSplit


def loss_fn(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-example cross-entropy (``reduction='none'``): the loss trials train on."""
    return F.cross_entropy(logits, y, reduction="none")


def _trainable(model: nn.Module, params) -> list[torch.Tensor]:
    return list(params) if params is not None else [p for p in model.parameters()
                                                     if p.requires_grad]


def _losses(model, x, y, loss) -> Iterator[torch.Tensor]:
    """Each example's loss, one forward at a time."""
    for i in range(len(y)):
        yield loss(model(x[i:i + 1]), y[i:i + 1]).sum()


def per_example_losses(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                       loss=loss_fn) -> torch.Tensor:
    """(B,) losses, one forward per example."""
    with torch.no_grad():
        return torch.stack(list(_losses(model, x, y, loss)))


def per_example_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor, params=None,
                      loss=loss_fn) -> list[torch.Tensor]:
    """Per parameter, the (B, *shape) gradients of each example's own loss: one backward per
    example. ``params`` defaults to the trainable parameters; one the loss does not reach
    gets zeros."""
    params = _trainable(model, params)
    rows = [torch.autograd.grad(one, params, allow_unused=True)
            for one in _losses(model, x, y, loss)]
    return [torch.stack([g if g is not None else torch.zeros_like(p) for g in col])
            for col, p in zip(zip(*rows), params)]


def full_gradient(model: nn.Module, split: DataSplit, params=None) -> list[torch.Tensor]:
    """(1/N) Σ_i ∇loss_i over a whole split, from the per-example loop."""
    return [g.mean(0) for g in per_example_grads(model, split.x, split.y, params)]


def batch_gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                   params=None) -> list[torch.Tensor]:
    """The gradient of the mean loss by one autograd call: the mini-batch gradient a plain
    step takes, computed independently of the optimizer (equal to it up to rounding)."""
    params = _trainable(model, params)
    return list(torch.autograd.grad(loss_fn(model(x), y).mean(), params))
