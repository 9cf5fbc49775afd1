"""VarianceProbe: Faghri's get_Ege_var statistics and the noise scale against float64 naive
references (loops over batches and examples), training left bit-identical by measuring, and
the |gradient| histograms with their log-spaced schedule."""
from __future__ import annotations

import copy
import itertools
import json
import math

import pytest
import torch
from reference import batch_gradient, loss_fn, per_example_grads
from torch import nn

from study import variance
from study.data import DataSplit, UniformSampler, epoch_generator
from study.optim import FAMILIES, Context, Optimizer, make_optimizer
from study.trial import probe_step, scheduled_work
from study.variance import (
    ProbeSettings,
    VarianceProbe,
    histogram_edges,
    log_spaced_iterations,
)

SEED = 3


def make_data(n=48, d=6, classes=3, dtype=torch.float64, seed=0) -> DataSplit:
    g = torch.Generator().manual_seed(seed)
    return DataSplit(torch.randn(n, d, generator=g, dtype=dtype),
                     torch.randint(0, classes, (n,), generator=g))


def make_mlp(dtype=torch.float64, dropout=0.0, seed=0) -> nn.Module:
    torch.manual_seed(seed)
    layers = [nn.Linear(6, 7), nn.Tanh()]
    if dropout:
        layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers, nn.Linear(7, 3)).to(dtype)


def train(opt: Optimizer, data: DataSplit, batch_size: int, epochs: int,
          probe: VarianceProbe | None = None) -> list[float]:
    """The trial loop's order: periodic work due at this iteration, then the probe (after the
    work, so SVRG has its iteration-0 snapshot), then direction and step."""
    periodic, it, losses = opt.periodic(), 0, []
    for epoch in range(epochs):
        ctx = Context(opt.model, loss_fn, data, batch_size, it, epoch,
                      epoch_generator(SEED, epoch, -1))
        for idx in opt.sampler(len(data), batch_size, epoch_generator(SEED, epoch)):
            scheduled_work(periodic, ctx, it)
            probe_step(probe, opt, it)
            d = opt.direction(data.batch(idx))
            opt.step(d)
            losses.append(d.loss)
            it += 1
        scheduled_work(periodic, ctx, epoch + 1, "epoch")
    return losses


# -- naive float64 references -----------------------------------------------------------------

def flat_per_example(model: nn.Module, params, batch) -> torch.Tensor:
    """(B, nw) in float64: ``reference.per_example_grads`` (one backward per example)."""
    grads = per_example_grads(model, batch.x, batch.y, params)
    return torch.cat([g.flatten(1) for g in grads], 1).double()


def naive_var_stats(mean_vecs: list[torch.Tensor], fresh_vecs: list[torch.Tensor]) -> dict:
    n, nw = len(fresh_vecs), fresh_vecs[0].numel()
    ege = [sum(v[j] for v in mean_vecs) / len(mean_vecs) for j in range(nw)]
    var = sum(sum((float(g[j]) - float(ege[j])) ** 2 for j in range(nw)) for g in fresh_vecs)
    nvar = snr = gnorm = 0.0
    for j in range(nw):
        s = sum(float(g[j]) ** 2 for g in fresh_vecs)
        dev = sum((float(g[j]) - float(ege[j])) ** 2 for g in fresh_vecs)
        nvar += dev / (s + 1e-7)
        snr += math.log(s + 1e-10) - math.log(dev + 1e-10)
        gnorm += s
    return {"var": var / n / nw, "nvar": nvar / nw, "logsnr": snr / nw, "gnorm": gnorm / n / nw,
            "ege": torch.tensor([float(e) for e in ege], dtype=torch.float64)}


def naive_noise_scale(per_example: torch.Tensor, population: int | None) -> dict:
    """McCandlish's B_simple from the (N, nw) per-example gradients, by its definition: N
    distinct examples of a set of ``population`` (finite-population correction 1/N − 1/M on
    |G|²), or N i.i.d. draws when ``population`` is None."""
    n = per_example.shape[0]
    mean = per_example.mean(0)
    trace = sum(float(((per_example[:, j] - mean[j]) ** 2).sum()) / (n - 1)
                for j in range(per_example.shape[1]))
    correction = 1 / n - (0 if population is None else 1 / population)
    unbiased = float((mean ** 2).sum()) - trace * correction
    grad_sq = max(unbiased, trace / n)
    return {"trace_sigma": trace, "grad_sq_norm": grad_sq, "noise_scale": trace / grad_sq,
            "grad_sq_unbiased": unbiased}


# -- (a), (b): statistics vs the naive references ---------------------------------------------

def prepared(family: str, data: DataSplit, batch_size: int, variant: str | None = None,
             **options) -> Optimizer:
    """An optimizer of ``family`` a few steps into training (momentum, snapshots, factors)."""
    model = make_mlp()
    opt = make_optimizer(family, model, loss_fn, 0.05, variant, **options)
    train(opt, data, batch_size, epochs=1)
    return opt


def applied_step(opt: Optimizer, batch) -> torch.Tensor:
    """What one real step on ``batch`` moves the weights by, per unit of lr: stepped on a deep
    copy of the optimizer (its model, buffers and moments), the original left alone."""
    twin = copy.deepcopy(opt)
    before = torch.cat([p.detach().reshape(-1) for p in twin.params]).clone()
    twin.step(twin.direction(batch))
    after = torch.cat([p.detach().reshape(-1) for p in twin.params])
    return (before - after) / twin.lr


# Every family on its defaults, and the update rules that are not the direction itself (the
# probe measures the update applied: momentum buffer, Nesterov look-ahead, Adam's moments).
# K-FAC's KL clip is out of range here (the probe measures its update without the clip).
ARMS = [(f, None, {}) for f in sorted(FAMILIES) if f != "kfac"] + [
    ("kfac", None, {"kl_clip": 1e30}), ("sgd", "plain", {}), ("sgd", "nesterov", {}),
    ("sgd", "plain", {"weight_decay": 0.1}), ("adam", None, {"weight_decay": 0.1})]


@pytest.mark.parametrize("family,variant,options", ARMS,
                         ids=[f"{f}-{v}-{'-'.join(o)}" for f, v, o in ARMS])
def test_statistics_match_naive_float64_reference(family, variant, options):
    data, bs = make_data(), 4
    opt = prepared(family, data, bs, variant, **options)
    measure = ProbeSettings(every=1, batches=3)
    probe = VarianceProbe(measure, data, bs, SEED, total_iterations=100)
    got = probe.measure(opt, 7)

    mean_set, fresh_set = probe.estimate_batches(7)
    assert len(mean_set) == len(fresh_set) == 3
    model, params = opt.model, opt.params
    sgd_mean = [flat_per_example(model, params, b).mean(0) for b in mean_set]
    fresh_pe = [flat_per_example(model, params, b) for b in fresh_set]
    sgd = naive_var_stats(sgd_mean, [pe.mean(0) for pe in fresh_pe])

    def flat_dir(b):
        return applied_step(opt, b).double()

    dir_mean, dir_fresh = mean_set, fresh_set
    if type(opt).sampler is not Optimizer.sampler:     # GC: measured on its own strata
        dir_mean, dir_fresh = probe.estimate_batches(7, opt.sampler, variance.OWN_SAMPLER_STREAM)
    dirs = naive_var_stats([flat_dir(b) for b in dir_mean], [flat_dir(b) for b in dir_fresh])
    for key in ("var", "nvar", "logsnr", "gnorm"):
        assert got[f"var/sgd_{key}"] == pytest.approx(sgd[key], rel=1e-9, abs=1e-14), key
        # weights minus weights after a step: float64 rounding of |θ| over lr·|update|
        assert got[f"var/dir_{key}"] == pytest.approx(dirs[key], rel=1e-6, abs=1e-12), key
    bias = float((dirs["ege"] - sgd["ege"]).abs().mean())
    assert got["var/bias"] == pytest.approx(bias, rel=1e-6, abs=1e-12)
    if type(opt).direction is Optimizer.direction and opt.steps_along_direction():
        assert got["var/bias"] == 0.0                  # the step IS the gradient

    assert len(torch.cat([b.idx for b in fresh_set]).unique()) == 12     # distinct examples
    ns = naive_noise_scale(torch.cat(fresh_pe), len(data))
    for key in ("trace_sigma", "grad_sq_norm", "noise_scale", "grad_sq_unbiased"):
        assert got[f"var/{key}"] == pytest.approx(ns[key], rel=1e-9), key
    assert got["var/noise_examples"] == sum(len(b) for b in fresh_set)


def test_mean_set_in_several_union_passes_matches_naive(monkeypatch):
    """Groups of 2 batches + a remainder of 1: the union passes must weight groups by size."""
    monkeypatch.setattr(variance, "UNION_EXAMPLES", 8)
    data, bs = make_data(), 4
    opt = make_optimizer("sgd", make_mlp(), loss_fn, 0.1)
    probe = VarianceProbe(ProbeSettings(every=1, batches=3), data, bs, SEED, 10)
    got = probe.measure(opt, 4)
    mean_set, fresh_set = probe.estimate_batches(4)
    ref = naive_var_stats([flat_per_example(opt.model, opt.params, b).mean(0) for b in mean_set],
                          [flat_per_example(opt.model, opt.params, b).mean(0)
                           for b in fresh_set])
    for key in ("var", "nvar", "logsnr", "gnorm"):
        assert got[f"var/sgd_{key}"] == pytest.approx(ref[key], rel=1e-9, abs=1e-14), key


def test_noise_scale_matches_naive_formula_on_a_cnn_in_float32():
    """B_simple through conv layers (batch_stats' unfold path), float32 on the model side."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv1d(1, 3, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(),
                          nn.Linear(3 * 6, 4))
    g = torch.Generator().manual_seed(2)
    data = DataSplit(torch.randn(40, 1, 12, generator=g), torch.randint(0, 4, (40,), generator=g))
    opt = make_optimizer("sgd", model, loss_fn, 0.1)
    probe = VarianceProbe(ProbeSettings(every=1, batches=4), data, 5, SEED, 10)
    got = probe.measure(opt, 2)
    _, fresh = probe.estimate_batches(2)
    ns = naive_noise_scale(torch.cat([flat_per_example(model, opt.params, b) for b in fresh]),
                           len(data))
    for key in ("trace_sigma", "grad_sq_norm", "noise_scale"):
        assert got[f"var/{key}"] == pytest.approx(ns[key], rel=1e-4), key


def test_noise_scale_saturates_at_the_number_of_examples_when_noise_swamps_the_mean():
    """Random labels at initialization: the unbiased |G|² can fall below tr(Σ)/N; the
    clamp caps B_simple at N = batches × batch_size."""
    data = make_data(n=400, seed=5)
    opt = make_optimizer("sgd", make_mlp(seed=5), loss_fn, 0.1)
    probe = VarianceProbe(ProbeSettings(every=1, batches=2), data, 100, SEED, 10)
    values = [probe.measure(opt, it) for it in range(6)]
    for v in values:
        assert 0 < v["var/noise_scale"] <= 200 * (1 + 1e-12)
        assert v["var/noise_scale"] == pytest.approx(v["var/trace_sigma"] / v["var/grad_sq_norm"])


# -- (c): measuring leaves training untouched -------------------------------------------------

@pytest.mark.parametrize("family", sorted({"sgd", "adam"} | set(FAMILIES)))
def test_measuring_leaves_training_bit_identical(family):
    assert family in FAMILIES, f"family {family!r} must be registered"
    data, bs = make_data(n=40, dtype=torch.float32, seed=1), 4
    results = []
    for with_probe in (False, True):
        model = make_mlp(torch.float32, dropout=0.2, seed=4)   # dropout: uses the global RNG
        opt = make_optimizer(family, model, loss_fn, 0.05)
        torch.manual_seed(11)
        probe = VarianceProbe(ProbeSettings(every=3, batches=2, histogram_points=4), data, bs,
                              SEED, total_iterations=20) if with_probe else None
        losses = train(opt, data, bs, epochs=2, probe=probe)
        if probe is not None:
            assert len(probe.histograms()["iterations"]) == 4
        results.append(([p.detach().clone() for p in model.parameters()], losses,
                         torch.get_rng_state()))
    (w0, l0, r0), (w1, l1, r1) = results
    assert all(torch.equal(a, b) for a, b in zip(w0, w1))
    assert l0 == l1
    assert torch.equal(r0, r1)


def test_measure_leaves_no_autograd_state():
    data = make_data()
    model = make_mlp()
    opt = make_optimizer("sgd", model, loss_fn, 0.1)
    probe = VarianceProbe(ProbeSettings(every=1, batches=2), data, 4, SEED, 10)
    with torch.no_grad():                     # the caller's grad mode must not matter
        out = probe.measure(opt, 0)
        probe.record_histogram(opt, 0)
    assert torch.is_grad_enabled()
    assert all(math.isfinite(v) for v in out.values())
    assert all(p.grad is None for p in model.parameters())
    for m in model.modules():
        assert not m._forward_hooks and not m._backward_hooks and not m._forward_pre_hooks
    assert model.training


def test_probe_batches_are_not_trainings_batches():
    data, bs = make_data(), 4
    probe = VarianceProbe(ProbeSettings(every=1, batches=2), data, bs, SEED, 10)
    training = [idx for idx in UniformSampler(len(data), bs, epoch_generator(SEED, 0))][:4]
    mean_set, fresh_set = probe.estimate_batches(0)
    probe_idx = [b.idx for b in mean_set + fresh_set]
    assert not all(torch.equal(a, b) for a, b in zip(training, probe_idx))
    # each set is one without-replacement draw (n·B <= M here): distinct examples within it;
    # the two come from independent streams, so they may share examples
    for batches in (mean_set, fresh_set):
        used = torch.cat([b.idx for b in batches])
        assert used.unique().numel() == used.numel()


def test_more_batches_than_one_epoch_holds():
    data = make_data(n=20)
    probe = VarianceProbe(ProbeSettings(every=1, batches=3), data, 8, SEED, 10)  # 2 per epoch
    mean_set, fresh_set = probe.estimate_batches(1)
    assert [len(b) for b in mean_set + fresh_set] == [8] * 6


def test_schedule_and_bad_input():
    data = make_data()
    probe = VarianceProbe(ProbeSettings(every=5, start=10, batches=1), data, 4, SEED, 100)
    assert [i for i in range(40) if probe.due(i)] == [10, 15, 20, 25, 30, 35]
    off = VarianceProbe(ProbeSettings(every=0, histograms=False), data, 4, SEED, 100)
    assert not any(off.due(i) or off.histogram_due(i) for i in range(200))
    with pytest.raises(ValueError, match="batch_size"):
        VarianceProbe(ProbeSettings(), data, len(data) + 1, SEED, 100)
    with pytest.raises(ValueError, match="total_iterations"):
        VarianceProbe(ProbeSettings(), data, 4, SEED, 0)


# -- (d): histograms --------------------------------------------------------------------------

def test_log_spaced_histogram_schedule():
    its = log_spaced_iterations(896, 8)
    assert len(its) == 8 and its[0] == 0 and its[-1] == 895
    assert all(a < b for a, b in itertools.pairwise(its))
    for k, it in enumerate(its):                      # geometric in (iteration + 1)
        assert abs(it + 1 - 896 ** (k / 7)) <= 0.5
    small = log_spaced_iterations(5, 8)
    assert small[0] == 0 and small[-1] == 4 and len(small) == len(set(small)) <= 5
    assert log_spaced_iterations(100, 1) == [0]


def naive_histogram(values: list[float]) -> tuple[list[int], int, int, int]:
    edges = histogram_edges()
    counts, zeros, under, over = [0] * (len(edges) - 1), 0, 0, 0
    for v in values:
        a = abs(v)
        if a == 0:
            zeros += 1
            continue
        e = math.log10(a)
        if e < edges[0]:
            under += 1
        elif e >= edges[-1]:
            over += 1
        else:
            counts[next(k for k in range(len(counts)) if edges[k] <= e < edges[k + 1])] += 1
    return counts, zeros, under, over


def test_histograms_structure_counts_and_resume():
    data = make_data()
    model = make_mlp()
    opt = make_optimizer("sgd", model, loss_fn, 0.1)
    with torch.no_grad():
        model[2].weight[:, 0].zero_()         # a dead unit: exact zeros in its gradient
    total = 50
    probe = VarianceProbe(ProbeSettings(every=0, histogram_points=5), data, 4, SEED, total)
    due = [i for i in range(total) if probe.histogram_due(i)]
    assert due == log_spaced_iterations(total, 5)
    probe.record_histogram(opt, due[0])
    probe.record_histogram(opt, due[1])
    hist = json.loads(json.dumps(probe.histograms()))    # JSON-serializable as is
    assert hist["iterations"] == due[:2]
    names = [n for n, _ in model.named_parameters()]
    assert list(hist["layers"]) == names
    (batch,) = probe.batches(due[1], 2, 1)
    grads = batch_gradient(model, batch.x, batch.y)
    for name, g in zip(names, grads):
        entries = hist["layers"][name]
        assert [e["iteration"] for e in entries] == due[:2]
        e = entries[1]
        assert len(e["edges"]) == len(e["counts"]) + 1
        assert e["edges"][0] == -12 and e["edges"][-1] == 2
        assert (e["counts"], e["zeros"], e["underflow"], e["overflow"]) == \
            naive_histogram(g.reshape(-1).tolist())
    assert hist["layers"]["0.weight"][0]["zeros"] >= 6      # the zeroed row

    resumed = VarianceProbe(ProbeSettings(every=0, histogram_points=5), data, 4, SEED, total)
    resumed.load_state_dict(json.loads(json.dumps(probe.state_dict())))
    assert resumed.histograms() == hist
    assert not resumed.histogram_due(due[0]) and not resumed.histogram_due(due[1])
    assert resumed.histogram_due(due[2])


def test_log10_span_counts_the_decades_between_the_1st_and_99th_percentiles():
    """Magnitudes 10^k for k evenly over [-8, 0] (and exact zeros, which are left out): the
    1%..99% quantiles of log10|g| are 8·0.01 and 8·0.99 decades above −8."""
    k = torch.linspace(-8, 0, 100001, dtype=torch.float64)
    grads = [(10 ** k[:50000]).float(), -(10 ** k[50000:]), torch.zeros(1000)]
    assert variance.log10_span(grads) == pytest.approx(8 * 0.98, abs=1e-3)
    assert variance.log10_span([torch.zeros(3)]) == 0.0
