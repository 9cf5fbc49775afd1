"""Datasets and samplers: MNIST-1D generated locally (shapes, split, determinism, cache,
label noise), torchvision's MNIST / FashionMNIST / CIFAR-10 read from tiny files written in
their native formats (IDX and the CIFAR pickle batches), index samplers and batching."""
from __future__ import annotations

import pickle
import random
import struct

import numpy as np
import pytest
import torch

from study.data import DataSplit, UniformSampler, epoch_generator, load_dataset

MNIST1D_SIZE = 500  # 400 train / 100 test; generation takes well under a second


@pytest.fixture(scope="module")
def mnist1d_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("mnist1d")
    load_dataset("mnist1d", root, size=MNIST1D_SIZE)  # generates and caches
    return root


# -- MNIST-1D ----------------------------------------------------------------------------------

def test_mnist1d_shapes_dtypes_classes_and_split(mnist1d_root):
    train, test = load_dataset("mnist1d", mnist1d_root, size=MNIST1D_SIZE)
    assert train.x.shape == (400, 1, 40) and test.x.shape == (100, 1, 40)  # 80/20
    assert train.x.dtype == test.x.dtype == torch.float32
    assert train.y.dtype == test.y.dtype == torch.int64
    assert set(train.y.tolist()) == set(range(10)) and set(test.y.tolist()) <= set(range(10))
    assert torch.isfinite(train.x).all() and train.x.std() > 0.1


def test_mnist1d_generation_is_deterministic_and_cached(mnist1d_root, tmp_path):
    cache = mnist1d_root / f"mnist1d_{MNIST1D_SIZE}.npz"
    assert cache.exists()
    stamp = cache.stat().st_mtime_ns
    first = load_dataset("mnist1d", mnist1d_root, size=MNIST1D_SIZE)    # read from the cache
    fresh = load_dataset("mnist1d", tmp_path, size=MNIST1D_SIZE)        # generated again
    assert cache.stat().st_mtime_ns == stamp  # the cached load did not rewrite the file
    for a, b in zip(first, fresh):
        assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)
    # the cache holds exactly what generation produced
    d = np.load(cache)
    assert np.array_equal(d["x"][:, None, :].astype(np.float32), first[0].x.numpy())
    assert np.array_equal(d["y_test"], first[1].y.numpy())


def test_mnist1d_generation_leaves_global_rngs_alone(tmp_path):
    """mnist1d's make_dataset reseeds the global RNGs; a trial's own seeding must survive."""
    np.random.seed(1234)
    random.seed(1234)
    torch.manual_seed(1234)
    np_state, py_state, torch_state = np.random.get_state(), random.getstate(), \
        torch.get_rng_state()
    load_dataset("mnist1d", tmp_path, size=MNIST1D_SIZE)
    after = np.random.get_state()
    assert after[0] == np_state[0] and np.array_equal(after[1], np_state[1])
    assert after[2:] == np_state[2:]
    assert random.getstate() == py_state
    assert torch.equal(torch.get_rng_state(), torch_state)


def test_mnist1d_label_noise_fraction_and_determinism(mnist1d_root):
    clean, clean_test = load_dataset("mnist1d", mnist1d_root, size=MNIST1D_SIZE)
    fraction = 0.3
    noisy, noisy_test = load_dataset("mnist1d", mnist1d_root, size=MNIST1D_SIZE,
                                     label_noise=fraction, seed=7)
    again, _ = load_dataset("mnist1d", mnist1d_root, size=MNIST1D_SIZE,
                            label_noise=fraction, seed=7)
    other, _ = load_dataset("mnist1d", mnist1d_root, size=MNIST1D_SIZE,
                            label_noise=fraction, seed=8)
    n = len(clean)
    chosen = round(fraction * n)
    changed = int((noisy.y != clean.y).sum())
    # each chosen label is redrawn uniformly over 10 classes: it stays the same w.p. 1/10
    expected, sd = chosen * 0.9, (chosen * 0.9 * 0.1) ** 0.5
    assert abs(changed - expected) < 5 * sd, (changed, expected)
    assert changed <= chosen
    assert torch.equal(noisy.y, again.y)          # same seed, same corruption
    assert not torch.equal(noisy.y, other.y)      # another seed, another corruption
    assert torch.equal(noisy.x, clean.x)          # inputs untouched
    assert torch.equal(noisy_test.y, clean_test.y)  # label_noise never touches test labels
    assert int(noisy.y.min()) >= 0 and int(noisy.y.max()) <= 9


def test_unknown_dataset_names_the_field(tmp_path):
    with pytest.raises(ValueError, match="dataset.name"):
        load_dataset("imagenet", tmp_path)


# -- torchvision formats -----------------------------------------------------------------------

def _write_idx(path, array: np.ndarray) -> None:
    """IDX ("SN3 Pascal Vincent"): big-endian magic 0x0800|ndim (uint8), dims, raw bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    magic = 0x0800 | array.ndim  # 2051 for images (N, H, W), 2049 for labels (N,)
    path.write_bytes(struct.pack(">i", magic) + struct.pack(f">{array.ndim}i", *array.shape)
                     + array.astype(np.uint8).tobytes())


def _write_mnist_like(root, folder: str, rng, n_train=12, n_test=5):
    raw = root / folder / "raw"
    data = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n, dtype=np.uint8)
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
        data[prefix] = (images, labels)
    return data


@pytest.mark.parametrize("name,folder", [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")])
def test_mnist_idx_files_round_trip(tmp_path, name, folder):
    data = _write_mnist_like(tmp_path, folder, np.random.default_rng(0))
    (images, labels), (images_t, labels_t) = data["train"], data["t10k"]
    assert (tmp_path / folder / "raw" / "train-images-idx3-ubyte").read_bytes()[:4] \
        == b"\x00\x00\x08\x03"  # 2051
    train, test = load_dataset(name, tmp_path)
    assert train.x.shape == (12, 1, 28, 28) and test.x.shape == (5, 1, 28, 28)
    assert train.x.dtype == torch.float32 and train.y.dtype == torch.int64
    assert torch.equal(train.y, torch.as_tensor(labels, dtype=torch.long))
    assert torch.equal(test.y, torch.as_tensor(labels_t, dtype=torch.long))
    # pixel/255, normalized by the *training* mean and std, for both splits
    scaled = images.astype(np.float64) / 255
    mean, std = scaled.mean(), scaled.std()
    for split, raw in ((train, images), (test, images_t)):
        expected = (raw.astype(np.float64)[:, None] / 255 - mean) / std
        np.testing.assert_allclose(split.x.numpy(), expected, rtol=1e-5, atol=1e-5)
        recovered = np.rint((split.x.double().numpy() * std + mean) * 255)
        assert np.array_equal(recovered[:, 0], raw)
    capped, _ = load_dataset(name, tmp_path, size=7)
    assert torch.equal(capped.y, train.y[:7])


class _Py2Str(bytes):
    """A Python 2 ``str``: CIFAR's batches were pickled by Python 2, so their keys load as
    ``str`` under torchvision's ``encoding="latin1"`` (and as ``b"data"`` under "bytes")."""


class _Py2Pickler(pickle._Pickler):
    dispatch = pickle._Pickler.dispatch.copy()

    def _save_py2_str(self, obj):
        self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + bytes(obj))
        self.memoize(obj)

    dispatch[_Py2Str] = _save_py2_str


def _write_cifar_pickle(path, obj) -> None:
    with open(path, "wb") as f:
        _Py2Pickler(f, protocol=2).dump(obj)


def _write_cifar10(root, rng, per_batch=3, n_test=4):
    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True)
    # pixel values < 200 except one marker, so a misplaced axis cannot go unnoticed
    batches = []
    for i in range(1, 6):
        data = rng.integers(0, 200, size=(per_batch, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, size=per_batch).tolist()
        _write_cifar_pickle(base / f"data_batch_{i}", {_Py2Str(b"data"): data,
                                                       _Py2Str(b"labels"): labels})
        batches.append((data, labels))
    data_t = rng.integers(0, 200, size=(n_test, 3072), dtype=np.uint8)
    labels_t = rng.integers(0, 10, size=n_test).tolist()
    _write_cifar_pickle(base / "test_batch", {_Py2Str(b"data"): data_t,
                                              _Py2Str(b"labels"): labels_t})
    names = [_Py2Str(n) for n in (b"airplane", b"automobile", b"bird", b"cat", b"deer",
                                  b"dog", b"frog", b"horse", b"ship", b"truck")]
    _write_cifar_pickle(base / "batches.meta", {_Py2Str(b"label_names"): names,
                                                _Py2Str(b"num_cases_per_batch"): per_batch,
                                                _Py2Str(b"num_vis"): 3072})
    return batches, (data_t, labels_t)


def test_cifar_pickle_keys_are_python2_strings(tmp_path):
    """The test files read like the real ones: str keys under latin1, bytes keys as bytes."""
    _write_cifar10(tmp_path, np.random.default_rng(0))
    path = tmp_path / "cifar-10-batches-py" / "data_batch_1"
    with open(path, "rb") as f:
        assert set(pickle.load(f, encoding="latin1")) == {"data", "labels"}
    with open(path, "rb") as f:
        assert set(pickle.load(f, encoding="bytes")) == {b"data", b"labels"}


def test_cifar10_pickle_batches_channel_major(tmp_path):
    rng = np.random.default_rng(1)
    batches, (data_t, labels_t) = _write_cifar10(tmp_path, rng)
    # mark one pixel: example 4 (batch 2, row 1), channel 2 (blue), row 3, column 30
    c, h, w = 2, 3, 30
    batches[1][0][1, c * 1024 + h * 32 + w] = 255
    _write_cifar_pickle(tmp_path / "cifar-10-batches-py" / "data_batch_2",
                        {_Py2Str(b"data"): batches[1][0], _Py2Str(b"labels"): batches[1][1]})
    train, test = load_dataset("cifar10", tmp_path)
    assert train.x.shape == (15, 3, 32, 32) and test.x.shape == (4, 3, 32, 32)
    assert train.x.dtype == torch.float32 and train.y.dtype == torch.int64
    assert train.y.tolist() == [label for _, labels in batches for label in labels]
    assert test.y.tolist() == labels_t
    flat = int(train.x[4].argmax())
    assert np.unravel_index(flat, (3, 32, 32)) == (c, h, w)
    # every value: row layout is 1024 red, 1024 green, 1024 blue, each row-major 32x32
    raw = np.concatenate([d for d, _ in batches]).astype(np.float64) / 255
    mean, std = raw.mean(), raw.std()
    np.testing.assert_allclose(train.x.numpy(), (raw.reshape(-1, 3, 32, 32) - mean) / std,
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(test.x.numpy(),
                               (data_t.reshape(-1, 3, 32, 32) / 255 - mean) / std,
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist", "cifar10"])
def test_missing_dataset_names_name_and_root(tmp_path, name):
    with pytest.raises(FileNotFoundError, match="dataset.name") as err:
        load_dataset(name, tmp_path)
    assert "dataset.root" in str(err.value) and str(tmp_path) in str(err.value)


# -- samplers and batching ---------------------------------------------------------------------

def _epoch(n, batch_size, seed, epoch, stream=0):
    return [b.tolist() for b in UniformSampler(n, batch_size, epoch_generator(seed, epoch,
                                                                                stream))]


def test_uniform_sampler_full_batches_without_repeats():
    n, bs = 103, 10
    sampler = UniformSampler(n, bs, epoch_generator(0, 0))
    batches = [b.tolist() for b in sampler]
    assert len(sampler) == len(batches) == n // bs
    assert all(len(b) == bs for b in batches)
    seen = [i for b in batches for i in b]
    assert len(set(seen)) == len(seen) == (n // bs) * bs
    assert all(0 <= i < n for i in seen)
    assert len(UniformSampler(n, n, epoch_generator(0, 0))) == 1


def test_uniform_sampler_is_seeded_by_seed_epoch_and_stream():
    base = _epoch(50, 5, seed=3, epoch=2)
    assert base == _epoch(50, 5, seed=3, epoch=2)
    assert base != _epoch(50, 5, seed=3, epoch=3)
    assert base != _epoch(50, 5, seed=3, epoch=2, stream=1)
    assert base != _epoch(50, 5, seed=4, epoch=2)


def test_uniform_sampler_rejects_batch_larger_than_data():
    with pytest.raises(ValueError, match="batch_size"):
        UniformSampler(10, 11, epoch_generator(0, 0))


def test_datasplit_batch_returns_the_given_indices():
    split = DataSplit(torch.arange(20.0).reshape(10, 2), torch.arange(10) % 3)
    idx = torch.tensor([7, 2, 9, 2])
    batch = split.batch(idx)
    assert torch.equal(batch.idx, idx)
    assert torch.equal(batch.x, split.x[idx]) and torch.equal(batch.y, split.y[idx])
    assert len(batch) == 4
    chunks = list(split.batches(4))
    assert [len(b) for b in chunks] == [4, 4, 2]
    assert torch.equal(torch.cat([b.idx for b in chunks]), torch.arange(10))
    assert torch.equal(torch.cat([b.x for b in chunks]), split.x)
