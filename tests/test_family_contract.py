"""The optimizer-family interface (study/optim/base.py), checked for every (family, variant)
the package registers, from one table (optax's ``_OPTIMIZERS_UNDER_TEST``). A family added
to study/optim/ joins the table by itself; give it small options in ``FAST_OPTIONS`` so that
its scheduled work happens within the few steps taken here (``test_cost_is_counted`` says
when some does not). Plugins (e.g. tests/plugins/faulty.py) are not part of the table.

(a) ``direction`` is pure, at the start and with non-trivial state, and training after it
goes on as if it had not been called; (b) a ``state_dict`` through torch.save continues bit
for bit in a new optimizer; (c) a trial interrupted and resumed through the real trial loop
ends with identical weights; (d) bad options name their field, the defaults construct;
(e) directions and scheduled work count their cost; (f) ``update_direction``, what the
variance probe measures, is the step ``step`` actually applies."""
from __future__ import annotations

import copy
import dataclasses
import re

import pytest
import torch
from _loop import (
    assert_same,
    checkpoint,
    make_context,
    restore,
    run_epochs,
    trial_resumes_exactly,
)
from reference import loss_fn
from torch import nn

from study.data import DataSplit, epoch_generator
from study.optim import FAMILIES, make_optimizer
from study.trial import scheduled_work

FAST_OPTIONS: dict[str, dict] = {
    "sgd": {"momentum": 0.9, "weight_decay": 1e-3},
    "adam": {"beta1": 0.8, "beta2": 0.99, "weight_decay": 1e-3},
    "snr": {"momentum": 0.5},
    "svrg": {"momentum": 0.5, "snapshot_unit": "iter", "snapshot_every": 3},
    "well_tempered": {"momentum": 0.5, "n": 2},        # accumulate: an update every 2 steps
    # factors every step, inverses every 2; weight decay starts at step 20·t_cov = 20, which
    # the round trip crosses after the resume
    "kfac": {"t_cov": 1, "t_inv": 2, "weight_decay": 1e-3},
    "gc": {"nclusters": 3, "citers": 1, "online_every": 1, "reinit_every": 2,
           "momentum": 0.5},
}
"""Per family: options that make its scheduled work happen within a few steps (and its
update rule carry state); a family without an entry runs on its defaults."""

BUILTIN = "study.optim."   # the modules of study/optim/ (registry.py); plugins live elsewhere
ENTRIES = [(family, variant, FAST_OPTIONS.get(family, {}))
           for family, cls in sorted(FAMILIES.items()) if cls.__module__.startswith(BUILTIN)
           for variant in cls.variants]
IDS = [f"{family}-{variant}" for family, variant, _ in ENTRIES]
each_entry = pytest.mark.parametrize("family, variant, options", ENTRIES, ids=IDS)

FEATURES, CLASSES, N, BATCH, LR = 6, 3, 40, 8, 0.05   # 5 steps per epoch
TRAINED, CONTINUED = 3, 2
"""Epochs before the checks (15 steps: every epoch periodic has run, GC samples from its
strata, well_tempered accumulate is mid-window) and after a resume (10 steps)."""


class Tiny(nn.Module):
    """Linear-Tanh-Linear on centred inputs; the centre is a buffer (SVRG snapshots buffers,
    and a pure direction must leave buffers alone too)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("centre", torch.linspace(-0.5, 0.5, FEATURES))
        self.net = nn.Sequential(nn.Linear(FEATURES, 5), nn.Tanh(), nn.Linear(5, CLASSES))

    def forward(self, x):
        return self.net(x - self.centre)


def make_model(seed: int = 0) -> Tiny:
    with torch.random.fork_rng(devices=[]):     # leaves the global RNG as it was
        torch.manual_seed(seed)
        return Tiny()


def make_data() -> DataSplit:
    g = torch.Generator().manual_seed(0)
    return DataSplit(2 * torch.randn(N, FEATURES, generator=g),
                     torch.randint(0, CLASSES, (N,), generator=g))


def trained(family, variant, options, epochs, costs=None):
    """(optimizer, context, cost) ``epochs`` epochs into training through ``_loop``; with 0
    epochs only the work due before the first step has run."""
    opt = make_optimizer(family, make_model(), loss_fn, LR, variant, **options)
    ctx = make_context(opt, make_data(), BATCH)
    if epochs:
        return opt, ctx, run_epochs(opt, ctx, epochs, costs=costs)
    return opt, ctx, scheduled_work(opt.periodic(), ctx, 0)


def next_batch(opt, ctx):
    """The batch training would take next (from the family's own sampler)."""
    sampler = opt.sampler(len(ctx.train), BATCH, epoch_generator(0, ctx.epoch))
    return ctx.train.batch(next(iter(sampler)))


def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and buffers (persistent or not), detached copies."""
    return {name: t.detach().clone() for name, t in
            [*model.named_parameters(), *model.named_buffers()]}


def test_table_holds_the_builtin_families():
    families = {family for family, _, _ in ENTRIES}
    assert {"sgd", "adam"} <= families
    assert set(FAST_OPTIONS) <= families, "FAST_OPTIONS names a family that is not registered"


# -- (a) direction is pure --------------------------------------------------------------------

@pytest.mark.parametrize("epochs", [0, TRAINED], ids=["at-start", "trained"])
@each_entry
def test_direction_is_pure(family, variant, options, epochs):
    opt, ctx, _ = trained(family, variant, options, epochs)
    model = opt.model
    batch = next_batch(opt, ctx)
    before = copy.deepcopy((opt.state_dict(), opt.metrics()))
    before_weights = weights(model)
    before_grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
    rng, grad_mode, training = torch.get_rng_state(), torch.is_grad_enabled(), model.training

    first = opt.direction(batch)
    kept = [t.detach().clone() for t in first.tensors]
    again = opt.direction(batch)

    assert [(t.shape, t.dtype) for t in kept] == [(p.shape, p.dtype) for p in opt.params]
    assert_same([t.detach() for t in again.tensors], kept, "direction called again")
    assert_same([t.detach() for t in first.tensors], kept, "first direction after the second")
    assert (again.loss, again.grad_evals) == (first.loss, first.grad_evals)
    assert_same((opt.state_dict(), opt.metrics()), before, "optimizer (state_dict, metrics)")
    assert_same(weights(model), before_weights, "model")
    assert_same([None if p.grad is None else p.grad for p in model.parameters()],
                before_grads, "p.grad")
    assert torch.equal(torch.get_rng_state(), rng), "direction() moved the global torch RNG"
    assert (torch.is_grad_enabled(), model.training) == (grad_mode, training)
    # state outside state_dict too: training goes on as if direction had not been called
    twin, twin_ctx, _ = trained(family, variant, options, epochs)
    assert run_epochs(opt, ctx, 1) == run_epochs(twin, twin_ctx, 1)
    assert_same(weights(model), weights(twin.model), "model an epoch later")
    assert_same(opt.state_dict(), twin.state_dict(), "optimizer state an epoch later")


# -- (b) state_dict round trip ----------------------------------------------------------------

@each_entry
def test_state_dict_round_trip_continues_bit_for_bit(family, variant, options):
    opt, ctx, _ = trained(family, variant, options, TRAINED)
    opt.lr *= 0.5                 # a schedule moved the learning rate: the state carries it
    saved = checkpoint(opt, ctx)

    model = make_model(seed=1)    # other weights: loading must overwrite every one
    resumed = make_optimizer(family, model, loss_fn, LR, variant, **options)
    ctx2 = make_context(resumed, make_data(), BATCH)
    restore(resumed, ctx2, saved)
    assert resumed.lr == opt.lr
    assert_same(resumed.metrics(), opt.metrics(), "metrics after loading")

    cost = run_epochs(opt, ctx, CONTINUED)
    assert run_epochs(resumed, ctx2, CONTINUED) == cost
    assert_same(weights(model), weights(opt.model), "model")
    assert_same(resumed.metrics(), opt.metrics(), "metrics")
    assert_same(resumed.state_dict(), opt.state_dict(), "optimizer state")


# -- (c) a trial interrupted and resumed ------------------------------------------------------

@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    """One MNIST-1D cache for every trial here (generating it takes about a second)."""
    return tmp_path_factory.mktemp("data")


@each_entry
def test_trial_resumes_exactly(tmp_path, data_root, family, variant, options):
    metrics, _ = trial_resumes_exactly(tmp_path, family, variant, options, data_root)
    assert metrics["epoch"] == 4 and not metrics["diverged"]


# -- (d) options ------------------------------------------------------------------------------

FIELDS = [(family, variant, options, field) for family, variant, options in ENTRIES
          for field in FAMILIES[family].Options.model_fields]


def option_error(family: str, field: str) -> str:
    """``OptionError``'s message: ``<family>.options.<field>: <message> (got <value>)``."""
    return rf"^{re.escape(family)}\.options\.{re.escape(field)}: .+ \(got .+\)$"


@pytest.mark.parametrize("family, variant, options, field", FIELDS,
                         ids=[f"{f}-{v}-{field}" for f, v, _, field in FIELDS])
def test_wrong_type_names_the_field(family, variant, options, field):
    default = FAMILIES[family].Options.model_fields[field].default
    wrong = [{"not": "a value"}] + ([] if isinstance(default, str) else ["0.5"])  # YAML text
    for value in wrong:
        with pytest.raises(ValueError, match=option_error(family, field)):
            make_optimizer(family, make_model(), loss_fn, LR, variant,
                           **{**options, field: value})


@each_entry
def test_unknown_option_is_refused_by_name(family, variant, options):
    with pytest.raises(ValueError, match=option_error(family, "no_such_option")):
        make_optimizer(family, make_model(), loss_fn, LR, variant, **options, no_such_option=1)


@each_entry
def test_defaults_construct_and_train(family, variant, options):
    opt = make_optimizer(family, make_model(), loss_fn, LR, variant)
    assert opt.variant == variant and opt.opts == FAMILIES[family].Options()
    run_epochs(opt, make_context(opt, make_data(), BATCH), 1)
    assert all(torch.isfinite(p).all() for p in opt.params)


# -- (e) cost ---------------------------------------------------------------------------------

@each_entry
def test_cost_is_counted(family, variant, options):
    costs = []
    opt, _, total = trained(family, variant, options, TRAINED, costs)
    steps = [c for what, c in costs if what == "direction"]
    assert len(steps) == TRAINED * (N // BATCH)
    assert all(type(c) is int and c > 0 for c in steps), steps
    declared = opt.periodic()
    for i, c in costs:
        if i != "direction":
            assert type(c) is int and c >= 0, (declared[i], c)
    ran = {i for i, _ in costs if i != "direction"}
    assert ran == set(range(len(declared))), (
        f"scheduled work that never ran in {TRAINED} epochs: "
        f"{[declared[i] for i in range(len(declared)) if i not in ran]}; "
        f"give {family!r} small options in FAST_OPTIONS")
    assert total == sum(c for _, c in costs)


# -- (f) the measured direction is the step ---------------------------------------------------

@each_entry
def test_update_direction_is_the_step_actually_applied(family, variant, options):
    """``update_direction(d)`` (what the variance probe measures) equals the parameter change
    ``step(d)`` makes, read off a copy that really steps: momentum, Nesterov, Adam's moments,
    weight decay and well-tempered's accumulated window included. K-FAC runs with a KL clip
    that never binds here (its measured direction leaves the clip out; tested in
    test_kfac.py)."""
    if family == "kfac":
        options = {**options, "kl_clip": 1e9}
    opt, ctx, _ = trained(family, variant, options, TRAINED)
    batch = next_batch(opt, ctx)
    d = opt.direction(batch)
    before = weights(opt.model)
    measured = opt.update_direction(d)
    assert_same(weights(opt.model), before)         # measuring changes nothing
    twin = copy.deepcopy(opt)
    twin.step(copy.deepcopy(d))
    applied = [(b - p.detach()) / LR for b, p in
               zip((before[name] for name, _ in opt.model.named_parameters()),
                   twin.model.parameters())]
    assert any(a.abs().max() > 0 for a in applied), "this step applies no update"
    for m, a in zip(measured, applied, strict=True):
        torch.testing.assert_close(m, a, rtol=1e-4, atol=2e-5)


def test_kfac_measures_its_step_without_the_kl_clip():
    """With a binding KL clip (ν < 1), K-FAC's measured direction is the step it would take
    with the clip left out (gvar_code's measurement path): a copy stepping along the
    preconditioned gradient before the clip moves by exactly it."""
    opt, ctx, _ = trained("kfac", "kfac", {**FAST_OPTIONS["kfac"], "kl_clip": 1e-9}, TRAINED)
    d = opt.direction(next_batch(opt, ctx))
    nu = float(d.extras["nu"])
    assert 0 < nu < 1, "the clip must bind for this test"
    unclipped = list(d.tensors)
    for iw, ib in opt.slots:
        for i in (iw, ib):
            if i is not None:
                unclipped[i] = unclipped[i] / nu
    before = [p.detach().clone() for p in opt.params]
    twin = copy.deepcopy(opt)
    twin.step(dataclasses.replace(d, tensors=unclipped))
    applied = [(b - p.detach()) / LR for b, p in zip(before, twin.params)]
    for m, a in zip(opt.update_direction(d), applied, strict=True):
        torch.testing.assert_close(m, a, rtol=1e-4, atol=2e-5)
