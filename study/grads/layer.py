"""Shared pieces of the per-layer handlers: what a handler returns, and the statistics of
materialized per-example gradients (used by conv, sequence Linear and the fallback)."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

# Per-example gradients are materialized in chunks of the batch so that at most this many
# elements live at once (32 Mi floats = 128 MiB in float32): memory stays bounded for wide
# layers while small layers still run as one batched matmul.
MATERIALIZE_BUDGET = 2 ** 25


@dataclass
class LayerStats:
    """Statistics of one module's parameters: ``sums``/``sum_sqs`` keyed by parameter,
    ``norms_sq`` the per-example squared norm over those parameters (or None)."""

    sums: dict[torch.Tensor, torch.Tensor] = field(default_factory=dict)
    sum_sqs: dict[torch.Tensor, torch.Tensor] = field(default_factory=dict)
    norms_sq: torch.Tensor | None = None

    def add_norms(self, norms: torch.Tensor) -> None:
        self.norms_sq = norms if self.norms_sq is None else self.norms_sq + norms


def record_materialized(out: LayerStats, param: torch.Tensor, per_example: torch.Tensor,
                        norms: bool, second_moment: bool = True) -> None:
    """Sum, sum of squares and per-example squared norms of gradients laid out as (B, ...)."""
    record_parts(out, param, [per_example.reshape(per_example.shape[0], -1)], norms,
                  second_moment, inplace=False)


def record_parts(out: LayerStats, param: torch.Tensor, parts: list[torch.Tensor],
                  norms: bool, second_moment: bool, inplace: bool) -> None:
    """The same for per-example gradients given as (B_i, P) chunks of the batch; ``inplace``
    squares the chunks in place (our own buffers)."""
    sums, sqs, norm_parts = [], [], []
    for flat in parts:
        sums.append(flat.sum(0))
        if second_moment or norms:
            sq = flat.mul_(flat) if inplace else flat * flat
            if second_moment:
                sqs.append(sq.sum(0))
            if norms:
                norm_parts.append(sq.sum(1))
    out.sums[param] = _total(sums).view(param.shape)
    if second_moment:
        out.sum_sqs[param] = _total(sqs).view(param.shape)
    if norms:
        out.add_norms(norm_parts[0] if len(norm_parts) == 1 else torch.cat(norm_parts))


def batch_chunks(batch: int, per_example_numel: int) -> list[slice]:
    """Slices of the batch whose materialized gradients fit ``MATERIALIZE_BUDGET``."""
    step = max(1, MATERIALIZE_BUDGET // max(1, per_example_numel))
    return [slice(s, min(s + step, batch)) for s in range(0, batch, step)]


def positions_stats(out: LayerStats, param: torch.Tensor, g: torch.Tensor,
                    a: torch.Tensor | Callable[[slice], torch.Tensor], norms: bool,
                    second_moment: bool = True, examples_per_product: int | None = None) -> None:
    """Weight statistics of a layer applied at T positions: ``g`` (B, [groups,] O, T) and
    ``a`` (B, [groups,] K, T), or a function giving ``a`` for a slice of the batch (so an
    unfolded input can be built a few examples at a time, while it is still in cache).

    The per-example gradient g_n a_nᵀ (summed over positions) is materialized by batched
    matmuls (the multiply-adds of the weight-gradient backward it replaces), then squared
    and reduced; chunked over the batch when it would exceed ``MATERIALIZE_BUDGET``.
    """
    take = a if callable(a) else (lambda sl: a[sl])
    batch, numel = g.shape[0], param.numel()
    parts = []
    for outer in batch_chunks(batch, numel):
        per = g.new_empty((outer.stop - outer.start, numel))
        step = examples_per_product or len(per)
        for start in range(outer.start, outer.stop, step):
            sl = slice(start, min(start + step, outer.stop))
            cols = take(sl)
            dst = per[sl.start - outer.start:sl.stop - outer.start]
            torch.matmul(g[sl], cols.transpose(-1, -2),
                         out=dst.view(len(dst), *g.shape[1:-1], cols.shape[-2]))
        parts.append(per)
    record_parts(out, param, parts, norms, second_moment, inplace=True)


def wants(wanted: list[torch.Tensor], param: torch.Tensor | None) -> bool:
    """Identity membership (``in`` on a list of tensors would compare values)."""
    return param is not None and any(param is q for q in wanted)


def _total(parts: list[torch.Tensor]) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.stack(parts).sum(0)
