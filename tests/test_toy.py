"""The gradient-scales notebook's sine2d: points N(0, I), labels by the rule x2 > sin(3·x1)
(checked independently in numpy), keyed generation (the same example whoever asks), fresh
training blocks that never repeat an example, and a trial on it through the normal spec."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from study.data import UniformSampler, epoch_generator, load_dataset
from study.keyed import keyed_uniform, mix32
from study.spec import parse_spec
from study.toy import (
    FIRST_EPOCH_BLOCK,
    TEST_BLOCK,
    TRAIN_BLOCK,
    GeneratedSplit,
    sine2d,
)
from study.trial import load_splits, run_trial


def test_mix32_is_the_reference_lowbias32():
    """Against the hash written with plain unbounded integers (Wellons' lowbias32)."""
    def reference(x):
        x ^= x >> 16
        x = (x * 0x7FEB352D) % 2 ** 32
        x ^= x >> 15
        x = (x * 0x846CA68B) % 2 ** 32
        return x ^ (x >> 16)
    values = [0, 1, 2, 12345, 2 ** 31, 2 ** 32 - 1, 0xDEADBEEF]
    assert [mix32(v) for v in values] == [reference(v) for v in values]
    assert mix32(torch.tensor(values)).tolist() == [reference(v) for v in values]


def test_keyed_uniforms_are_uniform_and_depend_on_every_key_part():
    idx = torch.arange(200_000)
    u = keyed_uniform(0, 0, idx, 0)
    assert 0 < float(u.min()) and float(u.max()) < 1
    counts = torch.histc(u, bins=10, min=0, max=1)
    expected = len(idx) / 10
    assert float(((counts - expected) ** 2 / expected).sum()) < 40   # chi² (9 dof) p ~ 1e-5
    for other in (keyed_uniform(1, 0, idx, 0), keyed_uniform(0, 1, idx, 0),
                  keyed_uniform(0, -1, idx, 0), keyed_uniform(0, 0, idx, 1),
                  keyed_uniform(0, 0, idx + 2 ** 32, 0)):
        assert abs(float(torch.corrcoef(torch.stack([u, other]))[0, 1])) < 0.02
    assert torch.equal(keyed_uniform(0, 0, idx[[7, 3]], 0), u[[7, 3]])


def test_labels_follow_the_rule_exactly_and_points_are_standard_normal():
    split = sine2d(100_000, TRAIN_BLOCK)
    x = split.x.double().numpy()
    assert split.x.dtype == torch.float32 and split.y.dtype == torch.int64
    assert np.array_equal(split.y.numpy(), (x[:, 1] > np.sin(3 * x[:, 0])).astype(np.int64))
    n = len(x)
    assert np.all(np.abs(x.mean(0)) < 5 / np.sqrt(n))              # mean 0
    assert np.all(np.abs(x.std(0) - 1) < 5 * np.sqrt(0.5 / n))     # std 1
    assert abs(np.corrcoef(x.T)[0, 1]) < 5 / np.sqrt(n)            # independent coordinates
    # x -> -x maps class 1 to class 0 (sin is odd): the classes are balanced
    assert abs(split.y.double().mean() - 0.5) < 5 * 0.5 / np.sqrt(n)


def test_generated_examples_are_the_stored_ones():
    stored = sine2d(500, TRAIN_BLOCK)
    lazy = GeneratedSplit(500)
    idx = torch.tensor([499, 0, 17, 17])
    b = lazy.batch(idx)
    assert torch.equal(b.x, stored.x[idx]) and torch.equal(b.y, stored.y[idx])
    assert torch.equal(b.idx, idx)
    assert torch.equal(torch.cat([c.x for c in lazy.batches(128)]), stored.x)


def test_load_dataset_stored_and_fresh(tmp_path):
    train, test = load_dataset("sine2d", tmp_path, size=300)
    assert train.x.shape == (300, 2) and test.x.shape == (10_000, 2)
    assert torch.equal(test.x, sine2d(10_000, TEST_BLOCK).x)
    fresh, test2 = load_dataset("sine2d", tmp_path, size=300, fresh=True)
    assert isinstance(fresh, GeneratedSplit) and len(fresh) == 300
    assert torch.equal(fresh.batch(torch.arange(300)).x, train.x)   # epoch-less view: stored
    assert torch.equal(test2.y, test.y)
    with pytest.raises(ValueError, match="dataset.fresh"):
        load_dataset("mnist1d", tmp_path, size=500, fresh=True)
    with pytest.raises(ValueError, match="dataset.label_noise"):
        load_dataset("sine2d", tmp_path, size=300, fresh=True, label_noise=0.1)


def _epoch_batches(train, seed, epoch, bs):
    data = train.for_epoch(seed, epoch)
    return [data.batch(idx) for idx in UniformSampler(len(train), bs, epoch_generator(seed, epoch))]


def test_fresh_batches_never_repeat_and_are_reproducible():
    train = GeneratedSplit(400)
    seen = torch.cat([b.x for e in range(3) for b in _epoch_batches(train, 5, e, 100)])
    assert len(seen) == 1200 and len(torch.unique(seen, dim=0)) == 1200   # every point new
    again = torch.cat([b.x for e in range(3) for b in _epoch_batches(train, 5, e, 100)])
    assert torch.equal(seen, again)                                       # same seed, same data
    other = torch.cat([b.x for b in _epoch_batches(train, 6, 0, 100)])
    assert not torch.isin(other[:, 0], seen[:, 0]).any()                  # another seed: other data
    stored = train.batch(torch.arange(400)).x                             # metrics' examples
    assert not torch.isin(stored[:, 0], seen[:, 0]).any()


def tiny_sine2d(tmp_path, **dataset):
    return parse_spec({
        "name": "toy", "dataset": {"name": "sine2d", "size": 2000, "root": str(tmp_path),
                                   **dataset},
        "models": [{"name": "mlp", "widths": [20, 20]}], "epochs": 4, "lr": 0.3,
        "batch_size": [100], "families": {"sgd": {"variants": ["momentum"]}}, "seeds": [3],
        "measure": {"points": 2, "batches": 2, "histograms": False}})


def test_fresh_trial_runs_from_the_spec_and_resumes_exactly(tmp_path, monkeypatch):
    spec = tiny_sine2d(tmp_path, fresh=True)
    config = spec.trial_config(spec.trials()[0])
    train, val, test = load_splits(spec.dataset)
    assert (len(train), len(val), len(test)) == (1800, 200, 10_000)
    blocks = []
    original = GeneratedSplit.batch
    monkeypatch.setattr(GeneratedSplit, "batch",
                        lambda self, idx: blocks.append((self.seed, self.block)) or
                        original(self, idx))
    reports = []
    run_trial(config, report=lambda m, s: reports.append((m, s)))
    # a block of its own per epoch; the stored training block only for metrics and the probe
    assert set(blocks) == {(0, TRAIN_BLOCK)} | {(config.seed, FIRST_EPOCH_BLOCK + e)
                                                for e in range(4)}
    assert reports[-1][0]["test_accuracy"] > 0.6
    part = []
    run_trial(config, report=lambda m, s: part.append((m, s)), stop_after=2)
    rest = []
    run_trial(config, report=lambda m, s: rest.append((m, s)), state=part[-1][1])
    for key, value in reports[-1][1]["model"].items():
        assert torch.equal(value, rest[-1][1]["model"][key]), key


def test_stored_sine2d_trial_runs(tmp_path):
    spec = tiny_sine2d(tmp_path, label_noise=0.1)
    metrics = run_trial(spec.trial_config(spec.trials()[0]))
    assert metrics["iteration"] == 4 * (1800 // 100) and metrics["test_accuracy"] > 0.6


def test_a_generated_training_split_samples_the_examples_its_stored_block_holds():
    """``evaluate.train_examples`` on fresh data: the training split is generated when
    gathered (it holds no tensors); its fixed sample is the same examples as the sample of
    that block stored (before the fix: AttributeError, the sample read ``x`` directly)."""
    generated = GeneratedSplit(300, block=TRAIN_BLOCK).sample(40)
    stored = sine2d(300, TRAIN_BLOCK).sample(40)
    assert len(generated) == 40
    assert torch.equal(generated.x, stored.x) and torch.equal(generated.y, stored.y)
