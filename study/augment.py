"""On-device augmentation of image training batches: a random crop of the image zero-padded by
4 pixels on each side, then a horizontal flip with probability 1/2 (the CIFAR recipe of He et
al. 2016), computed on the batch's tensors where they live (no PIL, no DataLoader).

Each example's offsets and flip are pure functions of (trial seed, epoch, example index)
(``study.keyed``): an epoch sees every example under one crop, the next epoch under another,
whoever gathers it (the step, SVRG's and GC's passes over the epoch's data), and a resumed
trial sees exactly what an uninterrupted one saw, with no generator state to checkpoint.
The padding is 0 in the normalized inputs: the mean pixel, not torchvision's black.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from study.data import Batch, DataSplit
from study.keyed import keyed_uniform

PAD = 4
COMPONENTS = (100, 101, 102)    # keyed-random components: row offset, column offset, flip


def crop_flip(x: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, flip: torch.Tensor,
              pad: int = PAD) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, H, W): example b is the H×W window at row ``dy[b]``, column
    ``dx[b]`` (0 .. 2·pad) of ``x[b]`` zero-padded by ``pad``, mirrored left-right where
    ``flip[b]``; ``dy = dx = pad`` and no flip is the image itself."""
    b, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    rows = dy[:, None] + torch.arange(h, device=x.device)              # (B, H)
    cols = dx[:, None] + torch.arange(w, device=x.device)              # (B, W)
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    example = torch.arange(b, device=x.device)[:, None, None]
    out = padded[example, :, rows[:, :, None], cols[:, None, :]]       # (B, H, W, C)
    return out.permute(0, 3, 1, 2).contiguous()


def augment(x: torch.Tensor, seed: int, epoch: int, idx: torch.Tensor) -> torch.Tensor:
    """Random crops and flips of the examples ``idx`` in ``epoch`` of a trial with ``seed``."""
    dy, dx, flip = (keyed_uniform(seed, epoch, idx, c) for c in COMPONENTS)
    span = 2 * PAD + 1
    return crop_flip(x, (dy * span).long(), (dx * span).long(), flip < 0.5)


@dataclass
class AugmentedSplit(DataSplit):
    """A training split whose epochs (``for_epoch``) see augmented examples; the split itself
    (training metrics, the variance probe) reads them as stored."""

    seed: int | None = None
    epoch: int | None = None

    def batch(self, idx: torch.Tensor) -> Batch:
        b = super().batch(idx)
        if self.epoch is None:
            return b
        return Batch(augment(b.x, self.seed, self.epoch, b.idx), b.y, b.idx)

    def to(self, device) -> AugmentedSplit:
        return AugmentedSplit(self.x.to(device), self.y.to(device), self.seed, self.epoch)

    def for_epoch(self, seed: int, epoch: int) -> AugmentedSplit:
        return AugmentedSplit(self.x, self.y, seed, epoch)
