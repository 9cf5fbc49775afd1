"""The SGD and Adam families against ``torch.optim``: same float64 model copies, same batches,
20 steps, parameters equal to 1e-6 relative after every step. Checkpoints (through
``torch.save`` like the trial's) resume bit-identically, and bad settings are refused."""
from __future__ import annotations

import copy

import pytest
import torch
from _loop import reloaded
from reference import loss_fn

from study.data import DataSplit, UniformSampler, epoch_generator
from study.models import MLP
from study.optim import make_optimizer

N, FEATURES, CLASSES, BATCH, STEPS = 64, 8, 3, 16, 20
LR = {"sgd": 0.1, "adam": 0.01}


@pytest.fixture(scope="module")
def train() -> DataSplit:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, FEATURES, generator=g, dtype=torch.float64)
    y = torch.randint(0, CLASSES, (N,), generator=g)
    return DataSplit(x, y)


@pytest.fixture(scope="module")
def batches(train):
    """STEPS batches from the project's own sampler, a fresh permutation each epoch."""
    out = []
    for epoch in range(STEPS * BATCH // N):
        out += [train.batch(idx) for idx in UniformSampler(N, BATCH, epoch_generator(0, epoch))]
    return out[:STEPS]


def make_model():
    torch.manual_seed(1)
    return MLP(FEATURES, [16, 16], CLASSES).double()


def _torch_optimizer(family, params, variant, **opts):
    wd = opts.get("weight_decay", 0.0)
    if family == "sgd":
        momentum = 0.0 if variant == "plain" else opts.get("momentum", 0.9)
        return torch.optim.SGD(params, lr=LR["sgd"], momentum=momentum,
                               nesterov=variant == "nesterov", weight_decay=wd)
    return torch.optim.Adam(params, lr=LR["adam"], betas=(opts["beta1"], opts["beta2"]),
                            eps=opts["eps"], weight_decay=wd)


def _flat(model) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


CASES = [("sgd", v, {"momentum": 0.9, "weight_decay": wd})
         for v in ("plain", "momentum", "nesterov") for wd in (0.0, 0.05)]
CASES += [("adam", "adam", {"beta1": 0.8, "beta2": 0.99, "eps": 1e-6, "weight_decay": wd})
          for wd in (0.0, 0.05)]


@pytest.mark.parametrize("family,variant,opts", CASES,
                         ids=[f"{f}-{v}-wd{o['weight_decay']}" for f, v, o in CASES])
def test_matches_torch_optim_step_for_step(batches, family, variant, opts):
    ours_model, torch_model = make_model(), make_model()
    start = [p.detach().clone() for p in ours_model.parameters()]
    opt = make_optimizer(family, ours_model, loss_fn, LR[family], variant, **opts)
    reference = _torch_optimizer(family, torch_model.parameters(), variant, **opts)
    for step, batch in enumerate(batches):
        d = opt.direction(batch)
        assert all(p.grad is None for p in ours_model.parameters())  # direction is pure
        opt.step(d)
        reference.zero_grad()
        loss_fn(torch_model(batch.x), batch.y).mean().backward()
        reference.step()
        ours, theirs = _flat(ours_model), _flat(torch_model)
        excess = (ours - theirs).abs() - 1e-6 * theirs.abs()  # 1e-6 relative, 1e-12 absolute
        assert float(excess.max()) <= 1e-12, f"step {step}: off by {float(excess.max()):.3g}"
    moved = float((_flat(ours_model) - torch.cat([s.flatten() for s in start])).norm())
    assert moved > 1e-2  # the comparison covered real steps


def test_variants_take_different_paths(batches):
    """The variant must change the trajectory (guards against a variant being ignored)."""
    finals = {}
    for variant in ("plain", "momentum", "nesterov"):
        model = make_model()
        opt = make_optimizer("sgd", model, loss_fn, LR["sgd"], variant, momentum=0.9)
        for batch in batches:
            opt.step(opt.direction(batch))
        finals[variant] = _flat(model)
    assert not torch.allclose(finals["plain"], finals["momentum"])
    assert not torch.allclose(finals["momentum"], finals["nesterov"])


def test_direction_is_pure(batches):
    """Calling ``direction`` again (as the variance measurement does) changes nothing."""
    model = make_model()
    opt = make_optimizer("adam", model, loss_fn, LR["adam"])
    for batch in batches[:3]:
        opt.step(opt.direction(batch))
    before = copy.deepcopy(opt.state_dict())
    first = opt.direction(batches[3])
    again = opt.direction(batches[3])
    for a, b in zip(first.tensors, again.tensors):
        assert torch.equal(a, b)
    after = opt.state_dict()
    assert after["rule"]["t"] == before["rule"]["t"]
    for a, b in zip(after["rule"]["m"] + after["rule"]["v"],
                    before["rule"]["m"] + before["rule"]["v"]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("family,variant", [("sgd", "momentum"), ("sgd", "nesterov"),
                                            ("adam", "adam")])
def test_state_dict_round_trip_resumes_bit_identically(batches, family, variant):
    opts = {"weight_decay": 0.01}
    model = make_model()
    opt = make_optimizer(family, model, loss_fn, LR[family], variant, **opts)
    half = STEPS // 2
    for batch in batches[:half]:
        opt.step(opt.direction(batch))
    opt.lr *= 0.5  # a schedule moved the learning rate: the checkpoint must carry it
    # through torch.save now, as checkpoints are: training goes on in place
    saved = reloaded({"model": model.state_dict(), "optimizer": opt.state_dict()})

    def restored(load_optimizer_state: bool):
        state = copy.deepcopy(saved)
        m = make_model()
        m.load_state_dict(state["model"])
        o = make_optimizer(family, m, loss_fn, LR[family], variant, **opts)
        if load_optimizer_state:
            o.load_state_dict(state["optimizer"])
        return m, o

    resumed_model, resumed = restored(True)
    cold_model, cold = restored(False)  # same weights, fresh optimizer state
    assert resumed.lr == opt.lr
    for batch in batches[half:]:
        for o in (opt, resumed, cold):
            o.step(o.direction(batch))
    for a, b in zip(model.parameters(), resumed_model.parameters()):
        assert torch.equal(a, b)
    # the optimizer state mattered: without it the run goes elsewhere
    assert any(not torch.allclose(a, b) for a, b in zip(model.parameters(),
                                                        cold_model.parameters()))


@pytest.mark.parametrize("family", ["sgd", "adam"])
@pytest.mark.parametrize("lr", [0.0, -0.1])
def test_non_positive_lr_is_refused(family, lr):
    with pytest.raises(ValueError, match="lr"):
        make_optimizer(family, make_model(), loss_fn, lr)


def test_unknown_variant_option_or_family_is_refused():
    with pytest.raises(ValueError, match="variant"):
        make_optimizer("sgd", make_model(), loss_fn, 0.1, "heavyball")
    with pytest.raises(ValueError, match="variant"):
        make_optimizer("adam", make_model(), loss_fn, 0.1, "adamw")
    with pytest.raises(ValueError, match="betas"):
        make_optimizer("adam", make_model(), loss_fn, 0.1, betas=(0.9, 0.99))
    with pytest.raises(ValueError, match="dampening"):
        make_optimizer("sgd", make_model(), loss_fn, 0.1, "momentum", dampening=0.1)
    with pytest.raises(KeyError, match="rmsprop"):
        make_optimizer("rmsprop", make_model(), loss_fn, 0.1)


def test_nesterov_without_momentum_is_refused():
    """torch.optim.SGD refuses it too; silently running plain SGD would mislabel the trial."""
    with pytest.raises(ValueError, match="momentum"):
        make_optimizer("sgd", make_model(), loss_fn, 0.1, "nesterov", momentum=0.0)
