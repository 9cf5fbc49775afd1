"""The gradient-scales notebook's toy problem (``sine2d``): points x ~ N(0, I) in 2-D, class 1
where x2 > sin(3·x1), else 0 (NOTES-review.md §2; the notebook trained on a fresh batch of
10,000 points every step).

Example ``i`` of a block is a pure function of (seed, block, i) (``study.keyed``), so a split
of any size exists without being stored: ``GeneratedSplit.batch(idx)`` generates the examples
gathered. ``fresh: true`` trains each epoch on a block of its own (``for_epoch``): no example
is ever seen twice, and a resumed trial regenerates exactly the same points.
"""
from __future__ import annotations

import math

import torch

from study.data import Batch, DataSplit
from study.keyed import keyed_uniform

SINE2D_SIZE = 10_000        # training examples when dataset.size is not given
SINE2D_TEST = 10_000        # the fixed test set
DATA_SEED = 0               # the study's own examples (train, validation, test): every trial's
TRAIN_BLOCK, VAL_BLOCK, TEST_BLOCK = 0, -1, -2
FIRST_EPOCH_BLOCK = 1       # fresh epoch e trains on block (trial seed, 1 + e): never on the
                            # stored blocks the training metrics and the probe read


def sine2d_label(x: torch.Tensor) -> torch.Tensor:
    """The notebook's rule on (N, 2) points, decided in float64: 1 where x2 > sin(3·x1)."""
    x = x.to(torch.float64)
    return (x[:, 1] > torch.sin(3 * x[:, 0])).to(torch.long)


def sine2d_points(seed: int, block: int, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x float32 (N, 2), y int64 (N,)) for examples ``idx`` of (seed, block): Box-Muller on two
    keyed uniforms, so each coordinate is N(0, 1) and the two are independent."""
    u1, u2 = (keyed_uniform(seed, block, idx, c) for c in (0, 1))
    r, theta = torch.sqrt(-2 * torch.log(u1)), 2 * math.pi * u2
    x = torch.stack([r * torch.cos(theta), r * torch.sin(theta)], 1).to(torch.float32)
    return x, sine2d_label(x)


def sine2d(n: int, block: int, seed: int = DATA_SEED, device="cpu") -> DataSplit:
    """``n`` examples of a block, stored."""
    x, y = sine2d_points(seed, block, torch.arange(n, device=device))
    return DataSplit(x, y)


class GeneratedSplit(DataSplit):
    """``n`` sine2d examples of (seed, block), generated when gathered; its epochs (fresh
    training) each see a block of their own."""

    def __init__(self, n: int, seed: int = DATA_SEED, block: int = TRAIN_BLOCK, device="cpu"):
        self.n, self.seed, self.block, self._device = n, seed, block, torch.device(device)

    def __repr__(self) -> str:
        return f"GeneratedSplit(n={self.n}, seed={self.seed}, block={self.block})"

    def __len__(self) -> int:
        return self.n

    @property
    def device(self) -> torch.device:
        return self._device

    def example_shape(self) -> tuple[int, ...]:
        return (2,)

    def classes(self) -> int:
        return 2

    def batch(self, idx: torch.Tensor) -> Batch:
        idx = idx.to(self._device)
        return Batch(*sine2d_points(self.seed, self.block, idx), idx)

    def span(self, start: int, stop: int) -> Batch:
        return self.batch(torch.arange(start, stop))

    def to(self, device) -> GeneratedSplit:
        return GeneratedSplit(self.n, self.seed, self.block, device)

    def for_epoch(self, seed: int, epoch: int) -> GeneratedSplit:
        return GeneratedSplit(self.n, seed, FIRST_EPOCH_BLOCK + epoch, self._device)

    def hold_out(self, n_val: int) -> tuple[GeneratedSplit, DataSplit]:
        """(training split of n - n_val, a stored validation block of n_val)."""
        return (GeneratedSplit(self.n - n_val, self.seed, self.block, self._device),
                sine2d(n_val, VAL_BLOCK, DATA_SEED, self._device))
