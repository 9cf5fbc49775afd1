"""Stratified sampling over clusters and its importance weights (Faghri et al.,
fartashf/gvar_code: ``data.py`` ``GlusterSampler`` and ``estim/gluster.py``).

The sampler takes one example per non-empty cluster in turn, visiting the M clusters in a
fresh random order each cycle; each cluster serves its examples from its own shuffled cycle.
Any single draw is therefore from cluster k with probability 1/M and, given k, uniform over
its N_k members, so example i is drawn with probability 1/(M·N_k(i)). Weighting example i by
``w_i = M·N_k(i)/N`` makes the weighted batch mean an unbiased estimate of the full mean
gradient, whatever the batch size, and its variance is the within-cluster variance only.
"""
from __future__ import annotations

from collections.abc import Iterator

import torch


def cluster_counts(assignment: torch.Tensor, nclusters: int) -> torch.Tensor:
    return torch.bincount(assignment, minlength=nclusters)


def importance_weights(assignment: torch.Tensor, counts: torch.Tensor,
                       idx: torch.Tensor) -> torch.Tensor:
    """``w_i = M·N_k(i)/N`` for the examples ``idx`` (M = non-empty clusters)."""
    nonempty = int((counts > 0).sum())
    sizes = counts.to(torch.float64)[assignment[idx.to(assignment.device)]]
    return nonempty * sizes / assignment.numel()


class StratifiedSampler:
    """One epoch of ``n // batch_size`` batches drawn round-robin over clusters.

    ``assignment`` (n,) holds each example's cluster. Drawing is vectorized: the cluster
    sequence of the whole epoch is a stack of random permutations, and the j-th draw from
    cluster k takes the j-th element of k's stream (concatenated random permutations).
    """

    def __init__(self, assignment: torch.Tensor, batch_size: int, generator: torch.Generator):
        n = assignment.numel()
        if batch_size > n:
            raise ValueError(f"batch_size {batch_size} is larger than the training set ({n})")
        self.assignment = assignment.detach().cpu()
        self.n, self.batch_size, self.generator = n, batch_size, generator

    def __len__(self) -> int:
        return self.n // self.batch_size

    def __iter__(self) -> Iterator[torch.Tensor]:
        draws = self.draw(len(self) * self.batch_size)
        for i in range(len(self)):
            yield draws[i * self.batch_size:(i + 1) * self.batch_size]

    def draw(self, total: int) -> torch.Tensor:
        clusters = torch.unique(self.assignment)             # the M non-empty clusters
        m, g = clusters.numel(), self.generator
        cycles = -(-total // m)
        order = torch.rand(cycles, m, generator=g).argsort(1)
        sequence = clusters[order.reshape(-1)[:total]]        # cluster of each draw
        out = torch.empty(total, dtype=torch.long)
        slots = torch.argsort(sequence, stable=True)          # draws grouped by cluster
        start = 0
        for k, wanted in zip(*torch.unique(sequence, return_counts=True)):
            members = torch.nonzero(self.assignment == k).squeeze(1)
            reps = -(-int(wanted) // members.numel())
            perms = torch.rand(reps, members.numel(), generator=g).argsort(1)
            stream = members[perms.reshape(-1)[:int(wanted)]]
            out[slots[start:start + int(wanted)]] = stream
            start += int(wanted)
        return out
