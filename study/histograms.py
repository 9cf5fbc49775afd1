"""|gradient| histograms: counts of log10 |g| per parameter on fixed edges (the same edges in
every trial, so the report can pool and compare them), and the decades the entries span."""
from __future__ import annotations

from typing import Any

import torch

# Fixed histogram edges in log10 |g|: 4 bins per decade over [1e-12, 1e2].
LOG10_LOW, LOG10_HIGH, BINS_PER_DECADE = -12, 2, 4


def magnitude_histograms(grads: list[torch.Tensor]) -> list[dict[str, Any]]:
    """Per tensor, counts of log10|g| on fixed edges; exact zeros, values below the first edge
    and at or above the last edge are counted apart (``zeros``, ``underflow``,
    ``overflow``). One bincount over all tensors (slot = tensor × (bins + 3) + bin)."""
    edges = histogram_edges()
    bins = len(edges) - 1
    slots = bins + 3                                  # bins, zeros, underflow, overflow
    a = torch.cat([g.detach().reshape(-1) for g in grads]).abs().double()
    pos = (a.log10() - LOG10_LOW) * BINS_PER_DECADE   # -inf for exact zeros
    code = torch.where(a == 0, bins, torch.where(pos < 0, bins + 1, torch.where(
        pos >= bins, bins + 2, pos.clamp(0, bins - 1).floor()))).long()
    owner = torch.repeat_interleave(torch.arange(len(grads), device=a.device),
                                    torch.tensor([g.numel() for g in grads], device=a.device))
    table = torch.bincount(owner * slots + code, minlength=len(grads) * slots)
    return [{"edges": edges, "counts": row[:bins], "zeros": row[bins],
             "underflow": row[bins + 1], "overflow": row[bins + 2]}
            for row in table.view(len(grads), slots).tolist()]


def log10_span(grads: list[torch.Tensor], low: float = 0.01, high: float = 0.99) -> float:
    """Decades between the ``low`` and ``high`` quantiles of |g| over every nonzero entry
    (the gradient-scales notebook's point: one network's gradients span many decades)."""
    a = torch.cat([g.detach().reshape(-1) for g in grads]).abs()
    logs = a[a > 0].double().log10()
    if logs.numel() == 0:
        return 0.0
    k_low, k_high = (max(1, min(logs.numel(), round(q * logs.numel()))) for q in (low, high))
    return float(logs.kthvalue(k_high).values - logs.kthvalue(k_low).values)


def histogram_edges() -> list[float]:
    bins = (LOG10_HIGH - LOG10_LOW) * BINS_PER_DECADE
    return [LOG10_LOW + i / BINS_PER_DECADE for i in range(bins + 1)]
