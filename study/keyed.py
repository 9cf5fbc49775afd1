"""Random numbers that are pure functions of a key (seed, block, index, component).

A counter-based generator instead of a stateful one: the number for example ``i`` is the same
whoever asks for it and in whatever order, so generated data (``study.toy``) and per-example
augmentation (``study.augment``) need no generator state in a checkpoint, cost only the
examples gathered, and a resumed trial sees exactly what an uninterrupted one saw. Exact
integer arithmetic in int64 (products stay below 2**63): the same bits on every device.
"""
from __future__ import annotations

import torch

_M32 = 0xFFFFFFFF


def _mul32(x, c: int):
    """``(x * c) mod 2**32`` for ``0 <= x < 2**32``, without overflowing int64."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _M32


def mix32(x):
    """lowbias32 (C. Wellons' hash prospector): a well-mixing bijection of 32-bit integers.
    Works on Python ints and int64 tensors alike."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def keyed_uniform(seed: int, block: int, idx: torch.Tensor, component: int) -> torch.Tensor:
    """float64 uniforms in (0, 1), one per entry of ``idx`` (int64, >= 0), determined by
    (seed, block, index, component); ``block`` may be negative."""
    head = mix32(mix32(mix32(seed & _M32) ^ (block & _M32)) ^ (component & _M32))
    idx = idx.to(torch.int64)
    h = mix32(mix32(head ^ (idx >> 32)) ^ (idx & _M32))
    return (mix32(h ^ head).to(torch.float64) + 0.5) / 2.0 ** 32
