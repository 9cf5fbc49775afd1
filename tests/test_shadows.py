"""Shadow estimators (``measure.estimators``, Faghri et al.'s design): other families'
directions measured along the trajectory the trial's own optimizer trains.

Known truths: training is bit-identical with and without shadows (and a resumed trial with
shadows ends where an uninterrupted one does); on a population whose per-example gradients
are chosen, SGD at 2B has the variance a without-replacement batch of 2B must have; SVRG's
direction has zero variance where per-example gradients do not depend on the weights (its
control variate cancels the noise exactly); bad entries are refused naming the field.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch
from test_noise_scale import D, M, linear_probe, population

from study import contract as C
from study.shadows import EstimatorSettings, Shadow, parse_estimators
from study.spec import parse_spec
from study.spec_values import SpecError
from study.trial import run_trial

ESTIMATORS = ["sgd", "sgd_2b", "svrg", "gc"]


def tiny_spec(tmp_path, estimators, family="sgd", variant="plain"):
    return parse_spec({
        "name": "t", "dataset": {"name": "mnist1d", "size": 600, "root": str(tmp_path)},
        "models": [{"name": "mlp", "widths": [16]}], "epochs": 3, "lr": [0.1],
        "batch_size": [32], "families": {family: {"variants": [variant]}},
        "measure": {"points": 6, "batches": 2, "histograms": False,
                    "estimators": estimators},
        "checkpoint": {"every_s": 0}})     # a state every epoch: weights compared per epoch


def run(config, **kwargs):
    logged, reports = [], []
    run_trial(config, log=lambda m, step: logged.append((step, dict(m))),
              report=lambda m, s: reports.append((m, s)), **kwargs)
    return logged, reports


@pytest.mark.parametrize("family,variant", [("sgd", "momentum"), ("gc", "online")])
def test_training_is_bit_identical_with_and_without_shadows(tmp_path, family, variant):
    with_shadows = tiny_spec(tmp_path, ESTIMATORS, family, variant)
    config = with_shadows.trial_config(with_shadows.trials()[0])
    plain = dataclasses.replace(config, measure=dataclasses.replace(config.measure,
                                                                    estimators=()))
    logged, reports = run(config)
    logged_plain, reports_plain = run(plain)
    for (m, s), (m0, s0) in zip(reports, reports_plain, strict=True):
        for key, value in s["model"].items():
            assert torch.equal(value, s0["model"][key]), key
        for key in (C.TRAIN_LOSS, C.TEST_ACCURACY, C.GRAD_EVALS, C.TRAIN_BATCH_LOSS):
            assert m[key] == m0[key], key
        assert m0[C.SHADOW_GRAD_EVALS] == 0
    # the shadows were measured, and what they cost is counted apart from training
    measured = [m for _, m in logged if "var/svrg_var" in m]
    assert len(measured) == 6
    for name in ("sgd_2b", "svrg", "gc"):
        assert all(m[C.variance_key(name, "var")] >= 0 for m in measured), name
    assert "var/sgd_var" in measured[0] and "var/sgd_2b_nvar" in measured[0]
    assert reports[-1][0][C.SHADOW_GRAD_EVALS] > 0          # SVRG's snapshots, GC's updates
    # the trial's own statistics are unchanged by the shadows beside them
    own = [{k: v for k, v in m.items() if k.startswith(("var/dir", "var/sgd_", "var/noise"))
            and not k.startswith("var/sgd_2b")} for _, m in logged if "var/dir_var" in m]
    own_plain = [{k: v for k, v in m.items() if k.startswith(("var/dir", "var/sgd_", "var/noise"))}
                 for _, m in logged_plain if "var/dir_var" in m]
    assert own == own_plain


def test_a_resumed_trial_with_shadows_measures_what_an_uninterrupted_one_does(tmp_path):
    spec = tiny_spec(tmp_path, ESTIMATORS)
    config = spec.trial_config(spec.trials()[0])
    logged, reports = run(config)
    _, part = run(config, stop_after=1)
    torch.save(part[-1][1], tmp_path / "state.pt")
    state = torch.load(tmp_path / "state.pt", weights_only=False)
    logged_rest, rest = run(config, state=state)
    resumed_at = part[-1][0][C.ITERATION]

    def measurements(logs):
        return [(step, m) for step, m in logs if "var/dir_var" in m and step >= resumed_at]
    assert measurements(logged_rest) == measurements(logged)   # every statistic, bit for bit
    assert any("var/gc_var" in m for _, m in measurements(logged))
    assert rest[-1][0][C.SHADOW_GRAD_EVALS] == reports[-1][0][C.SHADOW_GRAD_EVALS]


def shadow_variance(x: torch.Tensor, settings: EstimatorSettings, batch_size: int, batches: int,
                    measurements: int) -> list[dict[str, float]]:
    """The probe's shadow statistics on the linear population (per-example gradient x_i)."""
    probe, opt = linear_probe(x, batch_size, batches)
    shadow = Shadow(settings, 0, opt.model, opt.loss_fn, opt.lr, probe.train, batch_size, 0)
    shadow.begin_epoch(0, 0)
    shadow.work(0)
    shadow.work(0, "epoch")
    return [probe.measure(opt, it, [shadow]) for it in range(measurements)]


def test_sgd_at_2b_has_the_variance_of_a_batch_of_2b():
    """Population: tr(S²) = 1,500 (S² = Σ|x_i − G|²/(M − 1)). A shadow's mean set and fresh set
    are 2n consecutive batches of one without-replacement draw (2n·2B ≤ M here), so
    E[var·nw] = tr(S²)(1 + 1/n)/(2B) exactly: (S²/b − S²/M) for a batch, (S²/(nb) − S²/M)
    for the mean of n, and −S²/M covariance between them, twice. The probe's own plain
    gradient at B (independent mean and fresh sets) has tr(S²)(1 + 1/n)/B − 2 tr(S²)/M."""
    x = population(1500.0)
    (sgd_2b,) = parse_estimators(["sgd_2b"])
    B, n = 32, 5
    out = shadow_variance(x, sgd_2b, B, n, measurements=40)
    got_2b = sum(m["var/sgd_2b_var"] for m in out) / len(out) * D
    got_b = sum(m["var/sgd_var"] for m in out) / len(out) * D
    assert got_2b == pytest.approx(1500 * (1 + 1 / n) / (2 * B), rel=0.03)
    assert got_b == pytest.approx(1500 * (1 + 1 / n) / B - 2 * 1500 / M, rel=0.03)


def test_svrg_cancels_noise_that_does_not_depend_on_the_weights():
    """Per-example gradients x_i independent of w: g_i(w) − g_i(w̃) + μ̃ = μ̃ for every batch,
    so SVRG's variance is 0 (to rounding) while SGD's is not, also after the weights moved."""
    x = population(300.0, m=400, d=16)
    (svrg,) = parse_estimators(["svrg"])
    probe, opt = linear_probe(x, 16, 4)
    shadow = Shadow(svrg, 0, opt.model, opt.loss_fn, opt.lr, probe.train, 16, 0)
    shadow.begin_epoch(0, 0)
    shadow.work(0)
    for it in range(3):
        out = probe.measure(opt, it, [shadow])
        assert out["var/svrg_var"] < 1e-25 < out["var/sgd_var"]
        with torch.no_grad():                  # training moves the weights between measurements
            opt.params[0].add_(0.1)


@pytest.mark.parametrize("entry,field,message", [
    ("sgdd", "measure.estimators[1]", "unknown optimizer family 'sgdd'"),
    ("dir", "measure.estimators[1]", "must match"),
    ({"name": "m", "family": "sgd", "options": {"momentum": 1.5}},
     "measure.estimators[1].options.momentum", "less than 1"),
    ({"name": "v", "family": "sgd", "variant": "heavy"}, "measure.estimators[1]",
     "unknown variant 'heavy'"),
    ({"family": "sgd"}, "measure.estimators[1]", "probe's own plain gradient"),
    ("svrg", "measure.estimators[1]", "listed twice"),
])
def test_bad_estimators_are_refused_naming_the_entry(tmp_path, entry, field, message):
    with pytest.raises(SpecError) as err:
        tiny_spec(tmp_path, ["svrg", entry])
    assert f"{field}: " in str(err.value) and message in str(err.value)
