"""Shared pieces of the per-layer handlers: what a handler returns, and the statistics of
materialized per-example gradients (used by conv, sequence Linear and the fallback)."""
from __future__ import annotations

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
    flat = per_example.reshape(per_example.shape[0], -1)
    out.sums[param] = flat.sum(0).view(param.shape)
    if second_moment or norms:
        sq = flat * flat
        if second_moment:
            out.sum_sqs[param] = sq.sum(0).view(param.shape)
        if norms:
            out.add_norms(sq.sum(1))


def batch_chunks(batch: int, per_example_numel: int) -> list[slice]:
    """Slices of the batch whose materialized gradients fit ``MATERIALIZE_BUDGET``."""
    step = max(1, MATERIALIZE_BUDGET // max(1, per_example_numel))
    return [slice(s, min(s + step, batch)) for s in range(0, batch, step)]


def positions_stats(out: LayerStats, param: torch.Tensor, g: torch.Tensor, a: torch.Tensor,
                    norms: bool, second_moment: bool = True) -> None:
    """Weight statistics of a layer applied at T positions: ``g`` (B, [groups,] O, T) and
    ``a`` (B, [groups,] K, T); the per-example gradient is ``g_n a_nᵀ`` summed over positions.

    It is materialized with one batched matmul (the same multiply-adds as the weight-gradient
    backward it replaces), then squared and reduced; chunked over the batch when large.
    """
    batch = g.shape[0]
    numel = param.numel()
    parts_sum, parts_sq, parts_norm = [], [], []
    for sl in batch_chunks(batch, numel):
        per = torch.matmul(g[sl], a[sl].transpose(-1, -2)).reshape(-1, numel)
        parts_sum.append(per.sum(0))
        if second_moment or norms:
            sq = per.mul_(per)
            if second_moment:
                parts_sq.append(sq.sum(0))
            if norms:
                parts_norm.append(sq.sum(1))
    out.sums[param] = _total(parts_sum).view(param.shape)
    if second_moment:
        out.sum_sqs[param] = _total(parts_sq).view(param.shape)
    if norms:
        out.add_norms(torch.cat(parts_norm))


def _total(parts: list[torch.Tensor]) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.stack(parts).sum(0)


def wants(wanted: list[torch.Tensor], param: torch.Tensor | None) -> bool:
    """Identity membership (``in`` on a list of tensors would compare values)."""
    return param is not None and any(param is q for q in wanted)
