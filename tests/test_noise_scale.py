"""The gradient noise scale B_simple = tr(Σ) / |G|² against a population whose answer is known.

A bias-free ``nn.Linear(d, 1)`` whose per-example loss is its logit has the per-example
gradient x_i exactly, so a training set x_i = G + e_i (Σ e_i = 0) has the full gradient G and
the per-example variance S² = Σ|e_i|² / (M − 1), both chosen here. The probe's pooled
estimate (mean ``trace_sigma`` / mean ``grad_sq_unbiased`` over measurements, as
analysis.tables pools a setting) must find S² / |G|².

The old probe took its fresh set as consecutive batches of a without-replacement sampler
(spanning epochs at B = 512) and used the i.i.d. formula |ḡ|² − s²/N, which biases |G|² low
by about S²/M. On these CELLS (mean of 10 probe seeds) it pooled, for S²/|G|² = 1,500:
2,584 / 2,565 / 1,914 at B = 32 / 128 / 512 (+72% / +71% / +28%; 2,027 = +35% at n = 8);
for 300: 327 / 327 / 313 (+9% / +9% / +4.3%): six of the seven cells fail on it.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from study.data import DataSplit
from study.optim import make_optimizer
from study.variance import ProbeSettings, VarianceProbe

M, D = 3600, 2048           # training-set size (the default study's), gradient dimension


def population(ratio: float, m: int = M, d: int = D, seed: int = 0) -> torch.Tensor:
    """(m, d) per-example gradients x_i = G + e_i with |G| = 1, Σ e_i = 0 and
    S² = Σ|e_i|² / (m − 1) = ratio exactly."""
    g = torch.Generator().manual_seed(seed)
    grad = torch.randn(d, generator=g, dtype=torch.float64)
    grad /= grad.norm()
    e = torch.randn(m, d, generator=g, dtype=torch.float64)
    e -= e.mean(0)
    e *= (ratio * (m - 1) / e.square().sum()).sqrt()
    return grad + e


def logit_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return logits[:, 0]                 # d loss_i / d w = x_i


def linear_probe(x: torch.Tensor, batch_size: int, batches: int, seed: int = 0):
    model = nn.Linear(x.shape[1], 1, bias=False).double()
    data = DataSplit(x, torch.zeros(len(x), dtype=torch.long))
    opt = make_optimizer("sgd", model, logit_loss, 0.1)
    probe = VarianceProbe(ProbeSettings(every=1, batches=batches, histograms=False), data,
                          batch_size, seed, total_iterations=10**6)
    return probe, opt


def pooled_noise_scale(x: torch.Tensor, batch_size: int, batches: int, measurements: int,
                       seed: int = 0) -> float:
    """mean trace_sigma / mean grad_sq_unbiased over ``measurements`` measurements."""
    probe, opt = linear_probe(x, batch_size, batches, seed)
    trace = grad_sq = 0.0
    for it in range(measurements):
        out = probe.measure(opt, it)
        trace += out["var/trace_sigma"]
        grad_sq += out["var/grad_sq_unbiased"]
    return trace / grad_sq


@pytest.fixture(scope="module")
def populations():
    return {ratio: population(ratio) for ratio in (300, 1500)}


# (S²/|G|², B, n = batches, measurements). The counts make the pooled estimate's standard
# deviation ≤ 1.3% (so 5% is ≥ 4 sd; fewer are needed at large B, where one measurement
# averages more examples). Over probe seeds 0-9 the pooled estimates stayed within
# -1.4%..+2.1% of the truth in every cell (sd 0.3-1.3%); the test uses seed 0.
CELLS = [
    (300, 32, 5, 80),
    (300, 128, 5, 20),
    (300, 512, 5, 8),
    (1500, 32, 5, 800),
    (1500, 128, 5, 100),
    (1500, 512, 5, 12),
    (1500, 512, 8, 12),         # N = 4,096 > M: i.i.d. draws with replacement
]


@pytest.mark.parametrize("ratio, batch_size, batches, measurements", CELLS,
                         ids=[f"{r}-B{b}-n{n}" for r, b, n, _ in CELLS])
def test_pooled_noise_scale_finds_the_populations(populations, ratio, batch_size, batches,
                                                 measurements):
    got = pooled_noise_scale(populations[ratio], batch_size, batches, measurements)
    assert got == pytest.approx(ratio, rel=0.05)


def test_fresh_set_is_distinct_examples_independent_of_the_mean_set():
    x = population(10.0, m=200, d=4)
    probe, _ = linear_probe(x, batch_size=16, batches=5)
    mean_set, fresh = probe.estimate_batches(3)
    assert [len(b) for b in fresh] == [16] * 5
    idx = torch.cat([b.idx for b in fresh])
    assert idx.unique().numel() == 80                       # N = n·B distinct examples
    again_mean, again_fresh = probe.estimate_batches(3)
    assert all(torch.equal(a.idx, b.idx) for a, b in zip(fresh, again_fresh))   # seeded
    assert all(torch.equal(a.idx, b.idx) for a, b in zip(mean_set, again_mean))
    # the two sets come from different streams: not one permutation split in two
    assert not torch.equal(idx, torch.cat([b.idx for b in mean_set]))
    other = [torch.cat([b.idx for b in probe.estimate_batches(it)[1]]) for it in range(4)]
    assert len({tuple(o.tolist()) for o in other}) == 4     # a new draw per iteration


def test_fresh_set_larger_than_the_training_set_draws_with_replacement():
    x = population(10.0, m=50, d=4)
    probe, opt = linear_probe(x, batch_size=20, batches=4)    # N = 80 > M = 50
    _, fresh = probe.estimate_batches(0)
    assert [len(b) for b in fresh] == [20] * 4
    assert torch.cat([b.idx for b in fresh]).unique().numel() < 80
    out = probe.measure(opt, 0)
    pe = torch.cat([b.x for b in fresh])                     # per-example gradients
    mean = pe.mean(0)
    trace = float((pe - mean).square().sum()) / 79
    assert out["var/trace_sigma"] == pytest.approx(trace, rel=1e-10)
    assert out["var/grad_sq_unbiased"] == pytest.approx(float(mean.square().sum()) - trace / 80,
                                                        rel=1e-10)


def test_the_whole_training_set_gives_the_exact_answer():
    """N = M distinct examples: the correction vanishes (1/N − 1/M = 0) and both estimates
    are exact. The i.i.d. formula would give |G|² − S²/M = 1 − 20/40 here."""
    x = population(20.0, m=40, d=6)
    probe, opt = linear_probe(x, batch_size=8, batches=5)
    for it in range(3):
        out = probe.measure(opt, it)
        assert out["var/noise_examples"] == 40
        assert out["var/trace_sigma"] == pytest.approx(20.0, rel=1e-10)
        assert out["var/grad_sq_unbiased"] == pytest.approx(1.0, rel=1e-10)
        assert out["var/noise_scale"] == pytest.approx(20.0, rel=1e-10)
