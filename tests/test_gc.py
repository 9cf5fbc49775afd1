"""Gradient clustering: factorized distances, the stratified sampler and estimator, and the
variance it removes on data with planted gradient clusters."""
from __future__ import annotations

import itertools

import pytest
import torch
from _loop import (
    assert_same,
    checkpoint,
    make_context,
    reloaded,
    restore,
    run_epochs,
    trial_resumes_exactly,
)
from reference import full_gradient, loss_fn, per_example_grads
from torch import nn

from study.data import DataSplit, UniformSampler
from study.optim import make_optimizer
from study.optim.gc.distance import (
    PLANS,
    choose_plan,
    example_factors,
    layer_records,
    pooled_factors,
    sq_distances,
)
from study.optim.gc.stratified import StratifiedSampler

D64 = torch.float64


# -- distances ------------------------------------------------------------------------------

class SeqLinear(nn.Module):
    """A Linear applied at several positions (B, L, d): T > 1 for a Linear layer."""

    def __init__(self):
        super().__init__()
        self.inner, self.head = nn.Linear(5, 4), nn.Linear(4 * 3, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.inner(x.view(-1, 3, 5))).flatten(1))


MODELS = {
    "linear": (lambda: nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)), (6,)),
    "linear_nobias": (lambda: nn.Sequential(nn.Linear(6, 5, bias=False), nn.Tanh(),
                                            nn.Linear(5, 3)), (6,)),
    "linear_positions": (SeqLinear, (15,)),
    "conv1d": (lambda: nn.Sequential(nn.Conv1d(2, 3, 3, stride=2, padding=1), nn.Tanh(),
                                     nn.Flatten(), nn.Linear(3 * 5, 3)), (2, 9)),
    "conv2d": (lambda: nn.Sequential(nn.Conv2d(2, 3, 3, stride=2, padding=1), nn.Tanh(),
                                     nn.Conv2d(3, 2, 2, dilation=2, bias=False), nn.Tanh(),
                                     nn.Flatten(), nn.Linear(2 * 1 * 2, 3)), (2, 5, 7)),
    "conv2d_1x1": (lambda: nn.Sequential(nn.Conv2d(2, 3, 1, stride=2, bias=False), nn.Tanh(),
                                         nn.Flatten(), nn.Linear(3 * 3 * 2, 3)), (2, 5, 4)),
}


@pytest.mark.parametrize("plan", PLANS)
@pytest.mark.parametrize("name", list(MODELS))
def test_distances_equal_explicit_per_example_distances(name, plan):
    build, shape = MODELS[name]
    torch.manual_seed(0)
    model = build().to(D64)
    x, y = torch.randn(7, *shape, dtype=D64), torch.randint(0, 3, (7,))
    modules = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d))]
    factors = example_factors(model, loss_fn, x, y, modules)
    for module, f in zip(modules, factors):
        params = [module.weight] + ([module.bias] if module.bias is not None else [])
        per = per_example_grads(model, x, y, params)
        grads = per[0].flatten(2)                                  # (B, O, I): [∇W | ∇b]
        if len(per) == 2:
            grads = torch.cat([grads, per[1][:, :, None]], 2)
        ci = torch.randn(4, grads.shape[2], dtype=D64)
        co = torch.randn(4, grads.shape[1], dtype=D64)
        ci[0], co[0] = f.pooled()[0][2], f.pooled()[1][2]          # a center near example 2
        centers = torch.einsum("co,ci->coi", co, ci)
        expected = ((grads[:, None] - centers[None]) ** 2).sum((2, 3))
        dist, gg = sq_distances(f, ci, co, plan)
        torch.testing.assert_close(dist, expected, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(gg, (grads ** 2).sum((1, 2)), rtol=1e-10, atol=1e-12)


def test_plan_choice_follows_the_cost_estimate():
    assert choose_plan(128, 1, 785, 1024, 128) == "factored"        # Linear: never materialize
    assert choose_plan(128, 196, 26, 20, 128) == "materialize"      # small conv, many centers
    assert choose_plan(128, 4, 1000, 1000, 2) == "factored"         # wide conv, few positions


# -- planted clusters -----------------------------------------------------------------------

def planted(sizes=(20, 40, 60, 80), d=10, noise=0.05, seed=0):
    """Examples in tight groups: group k sits at a random point with label k, so the
    gradients of a linear classifier form one tight cluster per group."""
    g = torch.Generator().manual_seed(seed)
    means = 3 * torch.randn(len(sizes), d, generator=g, dtype=D64)
    group = torch.cat([torch.full((s,), k) for k, s in enumerate(sizes)])
    x = means[group] + noise * torch.randn(len(group), d, generator=g, dtype=D64)
    torch.manual_seed(seed)
    return nn.Linear(d, len(sizes)).to(D64), DataSplit(x, group % 4), group


def clustered(variant="batch", sizes=(2, 4, 6), batch_size=3, nclusters=3, **options):
    model, train, group = planted(sizes)
    opt = make_optimizer("gc", model, loss_fn, lr=0.1, variant=variant,
                         nclusters=nclusters, **options)
    ctx = make_context(opt, train, batch_size)
    if variant == "batch":
        opt.batch_snapshot(ctx)
    else:
        for _ in range(5):
            opt.em_step(ctx)
        opt.assignment_snapshot(ctx)
    return model, train, group, opt


def test_clustering_recovers_planted_groups():
    for variant in ("batch", "online"):
        _, _, group, opt = clustered(variant, sizes=(20, 40, 60, 80), batch_size=8,
                                     nclusters=4)
        pairs = set(zip(group.tolist(), opt.assignment.tolist()))
        assert len(pairs) == 4, (variant, pairs)   # one cluster per group, none mixed
        assert opt.metrics()["gc/nonempty_clusters"] == 4


def test_stratified_estimator_is_exactly_unbiased_by_enumeration():
    model, train, _, opt = clustered()
    members = [torch.nonzero(opt.assignment == k).squeeze(1) for k in range(3)]
    assert sorted(m.numel() for m in members) == [2, 4, 6]
    # with B = M every batch holds one example per cluster; enumerate all such batches
    for idx in opt.sampler(len(train), 3, torch.Generator().manual_seed(1)):
        assert sorted(opt.assignment[idx].tolist()) == [0, 1, 2]
    combos = list(itertools.product(*[m.tolist() for m in members]))
    dirs = [opt.direction(train.batch(torch.tensor(c))).tensors for c in combos]
    mean = [torch.stack(ts).mean(0) for ts in zip(*dirs)]
    for a, b in zip(mean, full_gradient(model, train)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_sampler_draws_each_example_with_probability_one_over_m_nk():
    assignment = torch.tensor([0] * 2 + [1] * 5 + [2] * 9 + [4] * 4)  # cluster 3 empty
    counts = torch.bincount(assignment).double()
    batch, epochs = 7, 400
    hits, batches = torch.zeros(20), 0
    gen = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        sampler = StratifiedSampler(assignment, batch, gen)
        assert len(sampler) == 20 // batch
        for idx in sampler:
            assert idx.numel() == batch
            hits += torch.bincount(idx, minlength=20)
            batches += 1
    expected = batches * batch / (4 * counts[assignment])          # M = 4 non-empty
    assert ((hits - expected).abs() < 5 * expected.sqrt()).all()
    assert not torch.allclose(expected, expected.mean().expand(20))  # not uniform


def test_stratified_direction_mean_matches_full_gradient_statistically():
    model, train, _, opt = clustered(batch_size=5)
    full = torch.cat([t.flatten() for t in full_gradient(model, train)])
    dirs = []
    for epoch in range(150):
        for idx in opt.sampler(len(train), 5, torch.Generator().manual_seed(epoch)):
            dirs.append(torch.cat([t.flatten() for t in opt.direction(train.batch(idx)).tensors]))
    dirs = torch.stack(dirs)
    stderr = dirs.std(0) / len(dirs) ** 0.5
    assert ((dirs.mean(0) - full).abs() <= 5 * stderr + 1e-12).all()


def direction_variance(opt, train, batch_size, draws=300, seed=7):
    gen, dirs = torch.Generator().manual_seed(seed), []
    while len(dirs) < draws:
        for idx in opt.sampler(len(train), batch_size, gen):
            dirs.append(torch.cat([t.flatten() for t in opt.direction(train.batch(idx)).tensors]))
    dirs = torch.stack(dirs[:draws])
    return float(((dirs - dirs.mean(0)) ** 2).sum(1).mean())


@pytest.mark.parametrize("variant", ["batch", "online"])
def test_gc_variance_is_below_sgd_on_planted_clusters(variant):
    model, train, _, gc = clustered(variant, sizes=(20, 40, 60, 80), batch_size=8, nclusters=4)
    sgd = make_optimizer("sgd", model, loss_fn, lr=0.1, variant="plain")
    var_gc, var_sgd = direction_variance(gc, train, 8), direction_variance(sgd, train, 8)
    print(f"{variant}: GC variance {var_gc:.3e}, SGD variance {var_sgd:.3e}, "
          f"ratio {var_gc / var_sgd:.2e}")
    assert var_gc < 0.05 * var_sgd


# -- optimizer contract ---------------------------------------------------------------------

def test_uniform_with_unit_weights_before_the_first_assignment():
    model, train, _ = planted()
    opt = make_optimizer("gc", model, loss_fn, lr=0.1, variant="batch", nclusters=4)
    assert isinstance(opt.sampler(len(train), 8, torch.Generator()), UniformSampler)
    sgd = make_optimizer("sgd", model, loss_fn, lr=0.1, variant="plain")
    batch = train.batch(torch.arange(8))
    for a, b in zip(opt.direction(batch).tensors, sgd.direction(batch).tensors):
        assert torch.equal(a, b)


def test_direction_changes_no_state():
    model, train, _, opt = clustered("online", sizes=(20, 40, 60, 80), batch_size=8,
                                     nclusters=4)
    before, weights = reloaded(opt.state_dict()["gc"]), reloaded(model.state_dict())
    batch = train.batch(torch.arange(0, 200, 25))
    rng = torch.get_rng_state()
    d1, d2 = opt.direction(batch), opt.direction(batch)
    assert torch.equal(rng, torch.get_rng_state())
    assert all(torch.equal(a, b) for a, b in zip(d1.tensors, d2.tensors))
    assert d1.grad_evals == 8
    assert_same(before, opt.state_dict()["gc"], "gc")
    assert_same(weights, model.state_dict(), "weights")
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("variant", ["batch", "online"])
def test_state_dict_round_trip_continues_bit_identically(variant):
    def fresh():
        model, train, _ = planted(sizes=(6, 10, 14, 18))
        model = model.float()
        train = DataSplit(train.x.float(), train.y)
        opt = make_optimizer("gc", model, loss_fn, lr=0.05, variant=variant, nclusters=5,
                             momentum=0.9, online_every=2, reinit_every=3, citers=2)
        return model, opt, make_context(opt, train, batch_size=8)

    model, opt, ctx = fresh()
    run_epochs(opt, ctx, epochs=1)
    saved = checkpoint(opt, ctx)
    run_epochs(opt, ctx, epochs=2)

    model2, opt2, ctx2 = fresh()
    restore(opt2, ctx2, saved)
    run_epochs(opt2, ctx2, epochs=2)
    assert_same({"model": model.state_dict(), "gc": opt.state_dict()["gc"]},
                {"model": model2.state_dict(), "gc": opt2.state_dict()["gc"]})


def test_batch_snapshot_cost_counts_pool_and_passes():
    model, train, _ = planted()
    opt = make_optimizer("gc", model, loss_fn, lr=0.1, variant="batch", nclusters=4, citers=3)
    cost = opt.batch_snapshot(make_context(opt, train, batch_size=8))
    assert opt.reinits == 0 and cost == 16 + 3 * len(train)       # pool max(4·C, B) + passes


def test_bad_options_name_the_field():
    model, _, _ = planted()
    for bad, field in (({"nclusters": 0}, "nclusters"), ({"beta": 1.0}, "beta"),
                       ({"online_every": 0}, "online_every")):
        with pytest.raises(ValueError, match=field):
            make_optimizer("gc", model, loss_fn, lr=0.1, **bad)
    grouped = nn.Sequential(nn.Conv1d(2, 2, 3, groups=2), nn.Flatten(), nn.Linear(2, 3))
    with pytest.raises(ValueError, match="groups"):
        make_optimizer("gc", grouped, loss_fn, lr=0.1)


def test_rebalancing_fills_an_empty_cluster_and_centers_are_cluster_means():
    model, train, _ = planted(sizes=(20, 40, 60, 80))
    opt = make_optimizer("gc", model, loss_fn, lr=0.1, variant="batch", nclusters=5, citers=1)
    ctx = make_context(opt, train, batch_size=8)
    opt.init_centers(ctx)
    for centers in (*opt.ci, *opt.co):
        centers[4] = 1e3                      # a center nobody is near: cluster 4 stays empty
    opt.batch_snapshot(ctx)
    assert opt.reinits == 1 and opt.counts[4] > 0 and (opt.counts > 0).all()
    # centers must be the means of the pooled factors of the final (rebalanced) assignment
    pooled = pooled_factors(layer_records(model, loss_fn, train.x, train.y, opt.modules))
    for (a, g), ci, co in zip(pooled, opt.ci, opt.co):
        for factor, center in ((a, ci), (g, co)):
            sums = torch.zeros_like(center).index_add_(0, opt.assignment, factor)
            torch.testing.assert_close(center, sums / opt.counts[:, None], rtol=1e-10,
                                       atol=1e-12)


def test_full_passes_keep_every_cluster_in_use():
    """Weighting a whole pass by the previous pass's sizes emptied clusters (all examples
    jump to the emptiest one); running sizes keep all of them populated and balanced."""
    g = torch.Generator().manual_seed(0)
    train = DataSplit(torch.randn(300, 12, generator=g), torch.randint(0, 5, (300,), generator=g))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 5))
    opt = make_optimizer("gc", model, loss_fn, lr=0.1, variant="batch", nclusters=8, citers=4)
    opt.batch_snapshot(make_context(opt, train, batch_size=16))
    assert (opt.counts > 0).all() and opt.reinits == 0
    assert int(opt.counts.max()) < 3 * 300 / 8


def test_online_reinit_copies_the_highest_distortion_cluster():
    _, train, _, opt = clustered("online", sizes=(20, 40, 60, 80), batch_size=8, nclusters=4,
                                 min_size=1.0)
    opt.sizes = torch.tensor([3.0, 0.1, 2.0, 2.9], dtype=D64)        # fair share B/C = 2
    opt.distortion = torch.tensor([1.0, 5.0, 7.0, 2.0], dtype=D64)   # 1 is small: skip it
    assert opt.reinit(make_context(opt, train, 8)) == 0 and opt.reinits == 1
    assert all(torch.equal(c[1], c[2]) for c in (*opt.ci, *opt.co))
    assert opt.sizes.tolist() == [3.0, 1.0, 1.0, 2.9]
    assert opt.distortion.tolist() == [1.0, 3.5, 3.5, 2.0]


@pytest.mark.parametrize("variant", ["batch", "online"])
def test_trial_with_gc_resumes_exactly(tmp_path, variant):
    metrics, _ = trial_resumes_exactly(tmp_path, "gc", variant,
                                       {"nclusters": 8, "online_every": 3, "reinit_every": 5})
    assert metrics["gc/nonempty_clusters"] == 8 and metrics["gc/total_distortion"] > 0


def test_probe_measures_gc_on_its_own_strata():
    """The variance probe draws GC's batches from GC's sampler: its measured direction is
    then unbiased (small bias against SGD) and far less variable than SGD's."""
    from study.variance import ProbeSettings, VarianceProbe

    model, train, _, opt = clustered(sizes=(20, 40, 60, 80), batch_size=8, nclusters=4)
    probe = VarianceProbe(ProbeSettings(every=1, batches=40), train, 8, seed=0,
                          total_iterations=10)
    got = probe.measure(opt, 0)
    assert got["var/dir_var"] < 0.05 * got["var/sgd_var"]
    full = torch.cat([g.reshape(-1) for g in full_gradient(model, train)])
    assert got["var/bias"] < 0.1 * float(full.abs().mean())


def test_family_registers_once_from_its_package():
    """study.optim imports the gc package (pkgutil lists it); the one class it registers is
    the package's."""
    from study.optim import FAMILIES
    from study.optim.gc import GC
    assert FAMILIES["gc"] is GC and GC.__module__ == "study.optim.gc.family"
