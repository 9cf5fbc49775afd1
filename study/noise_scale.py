"""The gradient noise scale B_simple (McCandlish et al. 2018, App. A) of one measurement.

B_simple = tr(Σ) / |G|² from the per-example gradients g_1..g_N of the fresh set, where
G is the full training-set gradient and tr(Σ) the training set's per-example variance
S² = Σ_m |g_m − G|² / (M − 1) (the finite population the trial samples from):
tr(Σ) = s² = Σ_i |g_i − ḡ|² / (N − 1), which is unbiased for S² for a without-replacement
sample, and |G|² = |ḡ|² − (1/N − 1/M) s², unbiased because a without-replacement mean has
E|ḡ|² = |G|² + (1/N − 1/M) S² (the finite-population correction; at N = M it is |ḡ|² =
|G|² exactly). With replacement (N > M) the draws are i.i.d. from the training set:
|G|² = |ḡ|² − s²/N, and s² then estimates the variance with denominator M, (M − 1)/M · S²
(1/M relative: 0.03% at M = 3,600). The estimator needs both: consecutive batches of a
without-replacement sampler spanning epochs (repeats, overlap with the mean set) and the
plain i.i.d. formula |ḡ|² − s²/N without the correction both bias |G|² low (by about
S²/M: pooled B_simple ≈ 2,600 instead of 1,500 at B = 32 and 128, ≈ 1,900 at B = 512, on
a population of M = 3,600; see tests/test_noise_scale.py).

When noise swamps the mean, the |G|² estimate can be ≤ 0; it is clamped at tr(Σ)/N, so the
noise scale saturates at N (one measurement cannot resolve a noise scale beyond the
examples it averaged) and ``noise_scale = trace_sigma / grad_sq_norm`` always holds for
the logged values. The unclamped estimate is logged as ``grad_sq_unbiased`` for pooling:
mean tr(Σ) / mean |G|² over many measurements (McCandlish et al., App. A).
"""
from __future__ import annotations

import torch

from study import contract as C


def noise_scale(ex_sum: torch.Tensor, ex_sq: torch.Tensor, n: int, population: int | None
                ) -> dict[str, torch.Tensor]:
    """B_simple from Σ_n g_n (flat) and Σ_n ||g_n||² over n examples: distinct examples of a
    training set of ``population`` (finite-population correction), or i.i.d. draws when
    ``population`` is None (module docstring)."""
    mean_sq = ex_sum.square().sum() / (n * n)                  # |ḡ|²
    trace = ((ex_sq / n - mean_sq) * n / (n - 1)).clamp(min=0)
    correction = 1 / n - (1 / population if population is not None else 0.0)
    unbiased = mean_sq - trace * correction
    grad_sq = torch.maximum(unbiased, trace / n)
    noise = torch.where(trace > 0, trace / grad_sq, torch.zeros_like(trace))
    # The unclamped |G|² estimate is logged too: averaged over many measurements before the
    # ratio is taken (McCandlish et al., App. A), it resolves noise scales above n.
    return {C.NOISE_SCALE: noise, C.TRACE_SIGMA: trace, C.GRAD_SQ_NORM: grad_sq,
            C.GRAD_SQ_UNBIASED: unbiased,
            C.NOISE_EXAMPLES: torch.tensor(float(n), dtype=trace.dtype)}
