"""nn.Embedding: per-example gradients as coalesced rows, never a dense (vocab × dim)
gradient per example.

Example n's weight gradient has one non-zero row per distinct token it contains: the sum
of g over that token's positions. ``torch.unique`` on (example, token) keys coalesces the
B·T rows into those, U ≤ B·T; then the sum, the second moment and the norms are
``index_add_`` of the rows, of their squares, and of their squared norms. Cost O(B·T·dim)
against the B·vocab·dim of torch.func (or of a dense fallback): the text model of
``bench/per_example.py`` runs many times faster than torch.func alone. The row
``padding_idx`` gets no gradient, as in PyTorch's backward. ``scale_grad_by_freq`` scales by
frequencies in the batch, which have no per-example meaning: such modules use the fallback.
"""
from __future__ import annotations

import torch
from torch import nn

from study.grads.layer import LayerStats, wants


def embedding_stats(module: nn.Embedding, a: torch.Tensor, g: torch.Tensor,
                    wanted: list[torch.Tensor], norms: bool,
                    second_moment: bool = True) -> LayerStats:
    out = LayerStats()
    if not wants(wanted, module.weight):
        return out
    batch, vocab, dim = a.shape[0], module.num_embeddings, module.embedding_dim
    ids = a.reshape(batch, -1)
    rows = g.reshape(-1, dim)
    example = torch.arange(batch, device=a.device).repeat_interleave(ids.shape[1])
    ids = ids.reshape(-1)
    if module.padding_idx is not None:
        keep = ids != module.padding_idx
        ids, rows, example = ids[keep], rows[keep], example[keep]
    keys, inverse = torch.unique(example * vocab + ids, return_inverse=True)
    coalesced = rows.new_zeros(len(keys), dim).index_add_(0, inverse, rows)
    tokens = keys % vocab
    weight = module.weight
    out.sums[weight] = weight.new_zeros(vocab, dim).index_add_(0, tokens, coalesced)
    if second_moment or norms:
        sq = coalesced.mul_(coalesced)
        if second_moment:
            out.sum_sqs[weight] = weight.new_zeros(vocab, dim).index_add_(0, tokens, sq)
        if norms:
            out.add_norms(weight.new_zeros(batch).index_add_(0, keys // vocab, sq.sum(1)))
    return out
