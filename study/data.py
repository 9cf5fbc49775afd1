"""Datasets as tensors on the trial's device, and index samplers.

A trial never uses a DataLoader: the whole training split lives on the device and batches are
gathered by index, so a batch costs one ``index_select`` and every batch knows which examples
it holds (GC and SVRG need the indices). Samplers are seeded per epoch, which makes a resumed
trial draw exactly the batches an uninterrupted one would.

Datasets: MNIST-1D generated locally by ``mnist1d.data.make_dataset`` (the offline default,
cached as .npz), MNIST / FashionMNIST / CIFAR-10 read by torchvision's own classes from
``root`` (downloaded only when ``download: true`` and the internet is reachable), and the
gradient-scales notebook's 2-D toy problem ``sine2d`` (``study.toy``; ``fresh`` = new examples
every epoch).
"""
from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

DATASETS = ("mnist1d", "mnist", "fashion_mnist", "cifar10", "sine2d")
FRESH_DATASETS = ("sine2d",)          # generated: can draw new examples every epoch
IMAGE_DATASETS = ("mnist", "fashion_mnist", "cifar10")   # can be augmented (study.augment)


@dataclass
class Batch:
    """Inputs, targets and the indices of the examples in their split."""

    x: torch.Tensor
    y: torch.Tensor
    idx: torch.Tensor

    def __len__(self) -> int:
        return self.y.shape[0]

    def split(self) -> DataSplit:
        """These examples as a split of their own (re-indexed from 0)."""
        return DataSplit(self.x, self.y)


@dataclass
class DataSplit:
    """A split held as two tensors; ``batch(idx)`` gathers examples by index."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return self.y.shape[0]

    @property
    def device(self) -> torch.device:
        return self.x.device

    def example_shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape[1:])

    def classes(self) -> int:
        """Number of classes: one more than the largest label."""
        return int(self.y.max()) + 1

    def batch(self, idx: torch.Tensor) -> Batch:
        idx = idx.to(self.x.device)
        return Batch(self.x.index_select(0, idx), self.y.index_select(0, idx), idx)

    def batches(self, batch_size: int) -> Iterator[Batch]:
        """In-order batches covering every example (evaluation and full passes)."""
        for start in range(0, len(self), batch_size):
            yield self.span(start, min(start + batch_size, len(self)))

    def span(self, start: int, stop: int) -> Batch:
        """Examples ``start`` to ``stop - 1``: views of the split's tensors, not a gather."""
        idx = torch.arange(start, stop, device=self.device)
        return Batch(self.x[start:stop], self.y[start:stop], idx)

    def to(self, device) -> DataSplit:
        return DataSplit(self.x.to(device), self.y.to(device))

    def for_epoch(self, seed: int, epoch: int) -> DataSplit:
        """The split as training sees it in ``epoch`` of a trial with ``seed``: itself; fresh
        data (a new block of examples) and augmentation (new crops) override it."""
        return self

    def sample(self, n: int | None) -> DataSplit:
        """``n`` of its examples (as stored) as a split of their own: a fixed sample, independent
        of any trial's seed, so every trial of a study evaluates the same ones; itself when
        ``n`` is None or not below its size."""
        if n is None or n >= len(self):
            return self
        return self.batch(self._fixed_order(54321)[:n]).split()

    def _fixed_order(self, seed: int) -> torch.Tensor:
        """A permutation of its indices that depends on ``seed`` alone (no trial's seed)."""
        perm = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))
        return perm.to(self.device)

    def hold_out(self, n_val: int) -> tuple[DataSplit, DataSplit]:
        """(the rest, ``n_val`` validation examples): a fixed permutation, independent of any
        trial's seed, so every trial of a study holds out the same examples."""
        perm = self._fixed_order(12345)
        return self.batch(perm[n_val:]).split(), self.batch(perm[:n_val]).split()


class UniformSampler:
    """One epoch of batches drawn without replacement; the last partial batch is dropped so
    every step sees exactly ``batch_size`` examples."""

    def __init__(self, n: int, batch_size: int, generator: torch.Generator):
        if batch_size > n:
            raise ValueError(f"batch_size {batch_size} is larger than the training set ({n})")
        self.n, self.batch_size, self.generator = n, batch_size, generator

    def __len__(self) -> int:
        return self.n // self.batch_size

    def __iter__(self) -> Iterator[torch.Tensor]:
        perm = torch.randperm(self.n, generator=self.generator)
        for i in range(len(self)):
            yield perm[i * self.batch_size:(i + 1) * self.batch_size]


def epoch_generator(seed: int, epoch: int, stream: int = 0) -> torch.Generator:
    """A generator determined by (seed, epoch, stream): training uses stream 0, the
    variance measurement its own streams, so measuring never shifts training's batches."""
    digest = hashlib.blake2b(f"{seed}/{epoch}/{stream}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & (2 ** 63 - 1))


# -- loading ---------------------------------------------------------------------------------

# Label-noise seed streams: each split's corruption draws from its own stream of ``seed``, so
# corrupting one split never moves the other's. The training stream is ``seed`` itself (as
# before test-label noise existed), the test stream a child of it (``SeedSequence(seed,
# spawn_key=(1,))``): statistically independent of it.
TRAIN_NOISE_STREAM, TEST_NOISE_STREAM = 0, 1


def load_dataset(name: str, root: str | Path, size: int | None = None, label_noise: float = 0.0,
                 seed: int = 0, download: bool = False,
                 device: str | torch.device = "cpu",
                 test_label_noise: float = 0.0, fresh: bool = False) -> tuple[DataSplit, DataSplit]:
    """(train, test) splits as float32 inputs and int64 labels on ``device``.

    ``size`` caps the number of training examples (MNIST-1D: total generated examples);
    ``label_noise`` replaces that fraction of training labels by uniformly random ones
    (seeded by ``seed``; Faghri's ``corrupt_perc``, the well-tempered notebook's 10%), and
    ``test_label_noise`` that fraction of test labels, the same way on an independent stream
    of ``seed`` (the well-tempered notebook corrupted its test labels too). Each option
    touches only its own split; the classes drawn from are those of the clean labels. See
    ``label_corruption`` for what exactly is replaced. ``fresh`` (generated datasets only):
    the training split is generated on the fly, a new block of ``size`` examples every epoch.
    """
    root = Path(root)
    if fresh and name not in FRESH_DATASETS:
        raise ValueError(f"dataset.fresh: only generated datasets {list(FRESH_DATASETS)} can "
                         f"draw fresh examples (got {name!r})")
    if fresh and label_noise:
        raise ValueError(f"dataset.label_noise: not with fresh examples (got {label_noise})")
    x = y = None                                 # fresh: no stored training examples
    if name == "sine2d":
        from study.toy import SINE2D_SIZE, SINE2D_TEST, TEST_BLOCK, TRAIN_BLOCK, sine2d

        if not fresh:
            x, y = _arrays(sine2d(size or SINE2D_SIZE, TRAIN_BLOCK))
        xt, yt = _arrays(sine2d(SINE2D_TEST, TEST_BLOCK))
    elif name == "mnist1d":
        x, y, xt, yt = _mnist1d(root, size or 5000)
    elif name in ("mnist", "fashion_mnist", "cifar10"):
        x, y, xt, yt = _torchvision(name, root, download)
        if size is not None:
            x, y = x[:size], y[:size]
    else:
        raise ValueError(f"dataset.name: unknown dataset {name!r}; choose from {list(DATASETS)}")
    # of the clean labels, before any corruption
    n_classes = int(max(yt.max(), yt.max() if y is None else y.max())) + 1
    if label_noise:
        y = _corrupt_labels(y, label_noise, seed, n_classes, TRAIN_NOISE_STREAM)
    if test_label_noise:
        yt = _corrupt_labels(yt, test_label_noise, seed, n_classes, TEST_NOISE_STREAM)
    if y is None:
        from study.toy import SINE2D_SIZE, GeneratedSplit
        train = GeneratedSplit(size or SINE2D_SIZE)
    else:
        train = DataSplit(torch.as_tensor(x, dtype=torch.float32),
                          torch.as_tensor(y, dtype=torch.long))
    test = DataSplit(torch.as_tensor(xt, dtype=torch.float32),
                     torch.as_tensor(yt, dtype=torch.long))
    return train.to(device), test.to(device)


def label_corruption(n: int, fraction: float, seed: int, n_classes: int,
                     stream: int = TRAIN_NOISE_STREAM) -> tuple[np.ndarray, np.ndarray]:
    """(indices, labels): which of ``n`` labels are replaced, and by what.

    Exactly ``round(fraction * n)`` distinct indices, drawn without replacement, each given a
    label drawn uniformly from ``0 .. n_classes - 1`` (so about 1 in ``n_classes`` of them keeps
    its label by chance); every other label is left as it is. Determined by (seed, stream).
    """
    entropy = np.random.SeedSequence(seed, spawn_key=(stream,) if stream else ())
    rng = np.random.default_rng(entropy)
    chosen = rng.choice(n, size=int(round(fraction * n)), replace=False)
    return chosen, rng.integers(0, n_classes, size=len(chosen))


def _corrupt_labels(y: np.ndarray, fraction: float, seed: int, n_classes: int,
                    stream: int = TRAIN_NOISE_STREAM) -> np.ndarray:
    y = np.array(y, copy=True)
    chosen, labels = label_corruption(len(y), fraction, seed, n_classes, stream)
    y[chosen] = labels
    return y


def _arrays(split: DataSplit) -> tuple[np.ndarray, np.ndarray]:
    return split.x.numpy(), split.y.numpy()


def _mnist1d(root: Path, size: int):
    """Generate MNIST-1D with the package's own generator (never its downloader); cache it."""
    cache = root / f"mnist1d_{size}.npz"
    if not cache.exists():
        from mnist1d.data import get_dataset_args, make_dataset

        args = get_dataset_args()
        args.num_samples = size
        # make_dataset reseeds numpy's and Python's global RNGs; put both back
        np_state, py_state = np.random.get_state(), random.getstate()
        data = make_dataset(args)
        np.random.set_state(np_state)
        random.setstate(py_state)
        root.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp.npz")
        np.savez(tmp, x=data["x"], y=data["y"], x_test=data["x_test"], y_test=data["y_test"],
                 meta=json.dumps({"num_samples": size, "generator": "mnist1d.make_dataset"}))
        tmp.replace(cache)  # atomic: concurrent trials never read a half-written cache
    d = np.load(cache)
    return d["x"][:, None, :], d["y"], d["x_test"][:, None, :], d["y_test"]


def _torchvision_splits(name: str, root: Path, download: bool):
    """(train, test) of torchvision's own class for ``name``; FileNotFoundError naming the
    dataset and the root when its files are not there."""
    from torchvision import datasets

    cls = {"mnist": datasets.MNIST, "fashion_mnist": datasets.FashionMNIST,
           "cifar10": _CIFAR10}[name]
    try:
        return tuple(cls(str(root), train=t, download=download) for t in (True, False))
    except RuntimeError as err:
        raise FileNotFoundError(
            f"dataset.name: {name} not found under dataset.root={root} ({err}); "
            "place the files there or set dataset.download: true where the internet is reachable"
        ) from err


def missing_dataset(name: str, root: str | Path) -> str | None:
    """Why ``name`` cannot be read from ``root`` without downloading (None when it can, and
    always for the generated datasets): what ``make reproduce`` prints when it skips a study."""
    if name not in IMAGE_DATASETS:   # torchvision's; the others are generated here
        return None
    try:
        _torchvision_splits(name, Path(root), download=False)
    except FileNotFoundError as err:
        return str(err).removeprefix("dataset.name: ")
    return None


def _torchvision(name: str, root: Path, download: bool):
    """Read a torchvision dataset through its own class; scale to [0, 1] and normalize."""
    train, test = _torchvision_splits(name, root, download)
    x, xt = (_images(d.data) for d in (train, test))
    mean, std = x.mean(), x.std()
    return ((x - mean) / std, np.asarray(train.targets), (xt - mean) / std,
            np.asarray(test.targets))


def _images(data) -> np.ndarray:
    """uint8 images (N,H,W) or (N,H,W,C) -> float32 (N,C,H,W) in [0, 1]."""
    a = np.asarray(data, dtype=np.float32) / 255.0
    return a[:, None] if a.ndim == 3 else a.transpose(0, 3, 1, 2)


def _cifar10_class():
    from torchvision.datasets import CIFAR10

    class LocalCIFAR10(CIFAR10):
        """torchvision's CIFAR10 with its md5 check relaxed to "the files are there", so a
        subset written in the native pickle format (tests, a trimmed copy) loads too."""

        meta = {**CIFAR10.meta, "md5": None}  # _load_meta checks its md5 on its own

        def _check_integrity(self) -> bool:
            base = Path(self.root) / self.base_folder
            return all((base / f).exists() for f, _ in self.train_list + self.test_list)

    return LocalCIFAR10


def _CIFAR10(*args, **kwargs):
    return _cifar10_class()(*args, **kwargs)


def input_shape(split: DataSplit) -> tuple[int, ...]:
    return split.example_shape()


def num_classes(*splits: DataSplit) -> int:
    return max(s.classes() for s in splits)
