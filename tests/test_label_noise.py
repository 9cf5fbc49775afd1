"""Label noise on each split: ``dataset.label_noise`` corrupts training labels (and, through
them, validation labels), ``dataset.test_label_noise`` test labels, each on its own seed
stream. Checked against the clean labels of MNIST-1D and of torchvision datasets written in
their native formats: exactly the chosen entries get the drawn labels, nothing else moves."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from test_bad_specs import VALID, broken
from test_data import _write_cifar10, _write_mnist_like

from study.data import TEST_NOISE_STREAM, TRAIN_NOISE_STREAM, label_corruption, load_dataset
from study.spec import SpecError, parse_spec
from study.spec_sections import DatasetSpec
from study.trial import load_splits

SIZE = 500  # MNIST-1D: 400 train / 100 test


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("mnist1d_noise")
    load_dataset("mnist1d", root, size=SIZE)  # generates and caches
    return root


def _n_classes(*ys: torch.Tensor) -> int:
    return int(max(int(y.max()) for y in ys)) + 1


def _assert_corrupted_exactly(noisy: torch.Tensor, clean: torch.Tensor, fraction: float,
                              seed: int, n_classes: int, stream: int) -> None:
    """``noisy`` is ``clean`` with exactly the chosen entries set to their drawn labels."""
    chosen, drawn = label_corruption(len(clean), fraction, seed, n_classes, stream)
    assert len(chosen) == round(fraction * len(clean))
    assert len(set(chosen.tolist())) == len(chosen)                    # distinct entries
    assert torch.equal(noisy[torch.as_tensor(chosen)], torch.as_tensor(drawn, dtype=torch.long))
    untouched = np.ones(len(clean), dtype=bool)
    untouched[chosen] = False
    mask = torch.as_tensor(untouched)
    assert torch.equal(noisy[mask], clean[mask])                       # the rest as they were
    changed = (noisy != clean).nonzero().flatten().tolist()
    assert set(changed) <= set(chosen.tolist())


# -- the mechanism ---------------------------------------------------------------------------

@pytest.mark.parametrize("n, fraction", [(100, 0.1), (400, 0.3), (5, 0.5), (7, 0.5), (10, 0.0),
                                         (10, 1.0), (3, 0.17)])
def test_corruption_picks_exactly_round_fraction_n_distinct_entries(n, fraction):
    for stream in (TRAIN_NOISE_STREAM, TEST_NOISE_STREAM):
        chosen, drawn = label_corruption(n, fraction, seed=3, n_classes=10, stream=stream)
        assert len(chosen) == len(drawn) == round(fraction * n)
        assert len(set(chosen.tolist())) == len(chosen)
        assert all(0 <= i < n for i in chosen) and all(0 <= c < 10 for c in drawn)


def test_corruption_streams_are_seeded_and_independent():
    def draw(seed, stream):
        chosen, drawn = label_corruption(1000, 0.2, seed, 10, stream)
        return chosen.tolist(), drawn.tolist()

    assert draw(0, TRAIN_NOISE_STREAM) == draw(0, TRAIN_NOISE_STREAM)
    assert draw(0, TEST_NOISE_STREAM) == draw(0, TEST_NOISE_STREAM)
    assert draw(0, TRAIN_NOISE_STREAM) != draw(0, TEST_NOISE_STREAM)
    assert draw(0, TEST_NOISE_STREAM) != draw(1, TEST_NOISE_STREAM)
    # the test stream is not the training stream shifted: its picks share only a chance
    # overlap with the training picks (expected 0.2 · 200 = 40 of 200)
    overlap = len(set(draw(0, TRAIN_NOISE_STREAM)[0]) & set(draw(0, TEST_NOISE_STREAM)[0]))
    assert 15 < overlap < 65, overlap


def test_training_corruption_is_the_one_label_noise_always_drew():
    """The training stream is ``default_rng(seed)``: adding test-label noise did not change
    which training labels an existing study corrupts."""
    rng = np.random.default_rng(7)
    chosen = rng.choice(400, size=120, replace=False)
    drawn = rng.integers(0, 10, size=120)
    got = label_corruption(400, 0.3, 7, 10, TRAIN_NOISE_STREAM)
    assert np.array_equal(got[0], chosen) and np.array_equal(got[1], drawn)


# -- MNIST-1D --------------------------------------------------------------------------------

def test_mnist1d_test_label_noise_corrupts_test_labels_only(root):
    clean, clean_test = load_dataset("mnist1d", root, size=SIZE)
    k = _n_classes(clean.y, clean_test.y)
    train, test = load_dataset("mnist1d", root, size=SIZE, seed=0, test_label_noise=0.1)
    _assert_corrupted_exactly(test.y, clean_test.y, 0.1, 0, k, TEST_NOISE_STREAM)
    assert int((test.y != clean_test.y).sum()) > 0
    assert torch.equal(train.y, clean.y)                               # train untouched
    assert torch.equal(train.x, clean.x) and torch.equal(test.x, clean_test.x)
    again = load_dataset("mnist1d", root, size=SIZE, seed=0, test_label_noise=0.1)[1]
    other = load_dataset("mnist1d", root, size=SIZE, seed=1, test_label_noise=0.1)[1]
    assert torch.equal(again.y, test.y)                                # same seed, same labels
    assert not torch.equal(other.y, test.y)                            # another seed, others


def test_mnist1d_train_and_test_noise_do_not_move_each_other(root):
    clean, clean_test = load_dataset("mnist1d", root, size=SIZE)
    k = _n_classes(clean.y, clean_test.y)
    train_only = load_dataset("mnist1d", root, size=SIZE, label_noise=0.3, seed=5)
    test_only = load_dataset("mnist1d", root, size=SIZE, test_label_noise=0.3, seed=5)
    both = load_dataset("mnist1d", root, size=SIZE, label_noise=0.3, test_label_noise=0.3,
                        seed=5)
    assert torch.equal(both[0].y, train_only[0].y)     # test noise leaves train labels alone
    assert torch.equal(both[1].y, test_only[1].y)      # train noise leaves test labels alone
    assert torch.equal(train_only[1].y, clean_test.y)
    assert torch.equal(test_only[0].y, clean.y)
    _assert_corrupted_exactly(both[0].y, clean.y, 0.3, 5, k, TRAIN_NOISE_STREAM)
    _assert_corrupted_exactly(both[1].y, clean_test.y, 0.3, 5, k, TEST_NOISE_STREAM)
    # a redrawn label keeps its class 1 time in 10: 30 redrawn test labels, about 27 change
    changed = int((both[1].y != clean_test.y).sum())
    assert 18 <= changed <= 30, changed


# -- torchvision native formats --------------------------------------------------------------

def _write(name, root, rng):
    if name == "mnist":
        _write_mnist_like(root, "MNIST", rng, n_train=40, n_test=30)
    else:
        _write_cifar10(root, rng, per_batch=8, n_test=30)


@pytest.mark.parametrize("name", ["mnist", "cifar10"])
def test_torchvision_test_label_noise(tmp_path, name):
    _write(name, tmp_path, np.random.default_rng(2))
    clean, clean_test = load_dataset(name, tmp_path)
    k = _n_classes(clean.y, clean_test.y)
    train, test = load_dataset(name, tmp_path, seed=0, test_label_noise=0.2)
    _assert_corrupted_exactly(test.y, clean_test.y, 0.2, 0, k, TEST_NOISE_STREAM)
    assert torch.equal(train.y, clean.y) and torch.equal(test.x, clean_test.x)
    both_train, both_test = load_dataset(name, tmp_path, seed=0, label_noise=0.25,
                                         test_label_noise=0.2)
    assert torch.equal(both_test.y, test.y)
    _assert_corrupted_exactly(both_train.y, clean.y, 0.25, 0, k, TRAIN_NOISE_STREAM)
    again = load_dataset(name, tmp_path, seed=0, label_noise=0.25, test_label_noise=0.2)
    assert torch.equal(again[0].y, both_train.y) and torch.equal(again[1].y, both_test.y)


# -- the splits a trial sees -----------------------------------------------------------------

def _positions(part: torch.Tensor, whole: torch.Tensor) -> torch.Tensor:
    """Index in ``whole`` of each row of ``part`` (MNIST-1D inputs are all distinct)."""
    rows = {x.numpy().tobytes(): i for i, x in enumerate(whole)}
    assert len(rows) == len(whole)
    return torch.tensor([rows[x.numpy().tobytes()] for x in part])


def test_validation_labels_are_the_corrupted_training_labels(root):
    """label_noise corrupts training labels before validation is carved out of them: each
    validation example carries its training label, corrupted or not, exactly; the test
    labels, without test_label_noise, are the clean ones."""
    clean, clean_test = load_dataset("mnist1d", root, size=SIZE)
    noisy = load_dataset("mnist1d", root, size=SIZE, label_noise=0.1, seed=0)[0]
    spec = DatasetSpec(name="mnist1d", size=SIZE, root=str(root), val_fraction=0.1,
                       label_noise=0.1)
    train, val, test = load_splits(spec)
    assert len(val) == 40 and len(train) == 360
    at_val, at_train = _positions(val.x, clean.x), _positions(train.x, clean.x)
    assert sorted(at_val.tolist() + at_train.tolist()) == list(range(400))
    assert torch.equal(val.y, noisy.y[at_val]) and torch.equal(train.y, noisy.y[at_train])
    # some validation labels really are corrupted, exactly those that corruption changed
    chosen, _ = label_corruption(400, 0.1, 0, 10, TRAIN_NOISE_STREAM)
    val_changed = set(at_val[val.y != clean.y[at_val]].tolist())
    assert val_changed and val_changed <= set(chosen.tolist())
    assert val_changed == set(at_val.tolist()) & set((noisy.y != clean.y).nonzero()
                                                     .flatten().tolist())
    assert torch.equal(test.y, clean_test.y)


def test_test_label_noise_leaves_validation_labels_clean(root):
    clean, clean_test = load_dataset("mnist1d", root, size=SIZE)
    spec = DatasetSpec(name="mnist1d", size=SIZE, root=str(root), test_label_noise=0.1)
    train, val, test = load_splits(spec)
    assert torch.equal(val.y, clean.y[_positions(val.x, clean.x)])
    assert torch.equal(train.y, clean.y[_positions(train.x, clean.x)])
    _assert_corrupted_exactly(test.y, clean_test.y, 0.1, 0, 10, TEST_NOISE_STREAM)


def test_every_trial_of_a_study_sees_the_same_noisy_labels(root):
    """load_splits seeds the corruption itself (seed 0), never from the trial's seed or the
    global RNGs a trial seeds."""
    spec = DatasetSpec(name="mnist1d", size=SIZE, root=str(root), label_noise=0.1,
                       test_label_noise=0.1)
    torch.manual_seed(1)
    np.random.seed(1)
    first = load_splits(spec)
    torch.manual_seed(2)
    np.random.seed(2)
    second = load_splits(spec)
    for a, b in zip(first, second):
        assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)


# -- the spec --------------------------------------------------------------------------------

def test_test_label_noise_defaults_off_and_is_read():
    assert parse_spec(copy.deepcopy(VALID)).dataset.test_label_noise == 0.0
    assert parse_spec(broken("dataset.test_label_noise", 0.1)).dataset.test_label_noise == 0.1
    assert parse_spec(broken("dataset.test_label_noise", 1)).dataset.test_label_noise == 1.0


@pytest.mark.parametrize("value, shown", [(1.5, "1.5"), (-0.1, "-0.1"), ("lots", "lots")])
def test_bad_test_label_noise_names_the_field(value, shown):
    with pytest.raises(SpecError) as err:
        parse_spec(broken("dataset.test_label_noise", value))
    message = str(err.value)
    assert "dataset.test_label_noise" in message and shown in message, message
