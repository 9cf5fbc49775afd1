"""On-device crop + flip: a chosen offset equals the image shifted and mirrored by hand; the
offsets and flips read back from augmented batches are uniform (0..8) and fair; augmentation
off leaves batches untouched; on, it is determined by (seed, epoch, index); a trial with it
runs from the spec and resumes exactly."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from test_data import _write_cifar10

from study.augment import AugmentedSplit, augment, crop_flip
from study.data import DataSplit
from study.spec import parse_spec
from study.trial import load_splits, run_trial


def test_a_chosen_crop_and_flip_is_the_image_shifted_and_mirrored_by_hand():
    x = torch.arange(2 * 3 * 6 * 7, dtype=torch.float32).reshape(2, 3, 6, 7) + 1
    # example 0: window at row 1, column 6 of the image padded by 4: output row r is image row
    # r - 3, output column c is image column c + 2; rows 0-2 and columns 5-6 fall in padding
    shifted = torch.zeros(3, 6, 7)
    shifted[:, 3:6, 0:5] = x[0, :, 0:3, 2:7]
    # example 1: the centre window (4, 4) is the image itself, then mirrored
    out = crop_flip(x, torch.tensor([1, 4]), torch.tensor([6, 4]), torch.tensor([False, True]))
    assert torch.equal(out[0], shifted)
    assert torch.equal(out[1], x[1, :, :, [6, 5, 4, 3, 2, 1, 0]])
    flipped = crop_flip(x, torch.tensor([1, 4]), torch.tensor([6, 4]), torch.tensor([True, False]))
    assert torch.equal(flipped[0], shifted.flip(-1)) and torch.equal(flipped[1], x[1])
    corner = crop_flip(x, torch.tensor([8, 0]), torch.tensor([8, 0]), torch.tensor([False, False]))
    assert torch.equal(corner[0, :, :2, :3], x[0, :, 4:, 4:])       # bottom-right corner
    assert float(corner[0, :, 2:].abs().sum()) == 0 and float(corner[0, :, :, 3:].abs().sum()) == 0


def _read_back(out: torch.Tensor, w: int):
    """(dy, dx, flip) of each crop of images whose pixel (r, c) holds 1 + r·w + c (0 is
    padding): output (i, j) shows pixel (i + dy - 4, j + dx - 4), or with the flip
    (i + dy - 4, (w - 1 - j) + dx - 4)."""
    dys, dxs, flips = [], [], []
    for img in out[:, 0]:
        i, j = (int(v) for v in torch.nonzero(img)[0])   # leftmost image pixel of its row
        r, c = divmod(int(img[i, j]) - 1, w)
        flip = bool(img[i, j + 1] < img[i, j])           # at least 6 columns are image
        dys.append(r - i + 4)
        dxs.append(c - (w - 1 - j) + 4 if flip else c - j + 4)
        flips.append(flip)
    return np.array(dys), np.array(dxs), np.array(flips)


def test_offsets_are_uniform_over_the_nine_shifts_and_flips_are_fair():
    n, h, w = 4000, 10, 10
    x = (torch.arange(h * w, dtype=torch.float32).reshape(1, 1, h, w) + 1).expand(n, 1, h, w)
    known = torch.randint(0, 9, (2, 300), generator=torch.Generator().manual_seed(0))
    mirror = torch.arange(300) % 2 == 0
    read = _read_back(crop_flip(x[:300], known[0], known[1], mirror), w)   # the reader itself
    assert all(np.array_equal(a, b.numpy()) for a, b in zip(read, (*known, mirror)))
    dy, dx, flip = _read_back(augment(x, seed=0, epoch=0, idx=torch.arange(n)), w)
    for offsets in (dy, dx):
        counts = np.bincount(offsets, minlength=9)
        assert len(counts) == 9 and counts.min() > 0
        assert ((counts - n / 9) ** 2 / (n / 9)).sum() < 35          # chi² (8 dof) p ~ 3e-5
    assert abs(flip.mean() - 0.5) < 5 * 0.5 / np.sqrt(n)


def test_augmentation_is_determined_by_seed_epoch_and_index():
    split = AugmentedSplit(torch.randn(50, 3, 8, 8), torch.arange(50) % 10)
    idx = torch.tensor([3, 14, 15, 49])
    a = split.for_epoch(0, 2).batch(idx)
    assert torch.equal(a.x, split.for_epoch(0, 2).batch(idx).x)           # reproducible
    assert torch.equal(a.x[1:3], split.for_epoch(0, 2).batch(idx[1:3]).x)  # per example
    for other in (split.for_epoch(0, 3), split.for_epoch(1, 2)):
        assert not torch.equal(a.x, other.batch(idx).x)
    assert torch.equal(a.y, split.y[idx]) and torch.equal(a.idx, idx)
    assert torch.equal(split.batch(idx).x, split.x[idx])     # the split itself: as stored


def test_augmentation_off_leaves_batches_as_they_were():
    split = DataSplit(torch.randn(20, 3, 8, 8), torch.arange(20) % 10)
    assert split.for_epoch(5, 3) is split


def cifar_spec(tmp_path, augment=True):
    _write_cifar10(tmp_path, np.random.default_rng(0), per_batch=8)
    return parse_spec({
        "name": "aug", "dataset": {"name": "cifar10", "root": str(tmp_path), "augment": augment,
                                   "val_fraction": 0.1},
        "models": [{"name": "mlp", "widths": [16]}], "epochs": 3, "lr": 0.05,
        "batch_size": [8], "families": {"sgd": {"variants": ["momentum"]}},
        "measure": {"points": 2, "batches": 2, "histograms": False}})


def test_augmented_trial_runs_from_the_spec_and_resumes_exactly(tmp_path):
    spec = cifar_spec(tmp_path)
    train, _, _ = load_splits(spec.dataset)
    assert isinstance(train, AugmentedSplit) and len(train) == 36
    config = spec.trial_config(spec.trials()[0])
    full, part, rest = [], [], []
    run_trial(config, report=lambda m, s: full.append(s))
    run_trial(config, report=lambda m, s: part.append(s), stop_after=1)
    run_trial(config, report=lambda m, s: rest.append(s), state=part[-1])
    for key, value in full[-1]["model"].items():
        assert torch.equal(value, rest[-1]["model"][key]), key
    plain = []
    plain_spec = cifar_spec(tmp_path / "plain", augment=False)
    run_trial(plain_spec.trial_config(plain_spec.trials()[0]),
              report=lambda m, s: plain.append(s))
    assert not all(torch.equal(v, plain[-1]["model"][k]) for k, v in full[-1]["model"].items())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_augmentation_on_the_gpu_matches_the_cpu():
    x, idx = torch.randn(64, 3, 32, 32), torch.arange(64)
    assert torch.equal(augment(x.cuda(), 1, 2, idx.cuda()).cpu(), augment(x, 1, 2, idx))
