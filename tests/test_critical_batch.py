"""The critical-batch analysis (McCandlish et al. 2018) against fronts whose answer is chosen:
an exact front S(B) = S_min(1 + B_crit/B) gives back B_crit and satisfies the paper's
(S/S_min − 1)(E/E_min − 1) = 1; a noisy one comes close; steps to a target interpolate
between logged epochs; the frontier picks the fastest lr and flags grid edges; the pooled
noise scale and its growth come from chosen tr(Σ), |G|² series."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from analysis.critical_batch import (
    fit_front,
    frontier,
    noise_scale_growth,
    pooled_noise_scale_near_target,
    steps_to_target,
)
from study import contract as C

BATCHES = [16, 32, 64, 128, 256, 512, 1024]


def test_steps_to_target_interpolates_between_logged_points():
    assert steps_to_target([10, 20, 30], [2.0, 1.0, 0.5], 0.75) == pytest.approx(25.0)
    assert steps_to_target([10, 20, 30], [2.0, 1.0, 0.5], 1.0) == 20.0
    assert steps_to_target([10, 20], [0.4, 0.3], 0.5) == 10.0
    assert math.isnan(steps_to_target([10, 20], [2.0, 1.0], 0.5))


def test_an_exact_front_gives_back_its_critical_batch():
    s_min, b_crit = 300.0, 96.0
    steps = [s_min * (1 + b_crit / b) for b in BATCHES]
    fit = fit_front(BATCHES, steps)
    assert fit["b_crit"] == pytest.approx(b_crit, rel=1e-9)
    assert fit["s_min"] == pytest.approx(s_min, rel=1e-9)
    # the paper's form of the same front holds at every point
    for b, s in zip(BATCHES, steps):
        e = b * s
        assert (s / fit["s_min"] - 1) * (e / fit["e_min"] - 1) == pytest.approx(1.0, rel=1e-9)


def test_a_noisy_front_comes_close():
    rng = np.random.default_rng(0)
    s_min, b_crit = 150.0, 200.0
    steps = [s_min * (1 + b_crit / b) * math.exp(rng.normal(0, 0.05)) for b in BATCHES]
    assert fit_front(BATCHES, steps)["b_crit"] == pytest.approx(b_crit, rel=0.25)


def test_a_front_without_a_large_batch_regime_keeps_its_parameters_nonnegative():
    fit = fit_front([16, 32, 64], [100.0, 100.0, 100.0])       # perfect scaling never ends
    assert fit["e_min"] == pytest.approx(0.0, abs=1e-9) and fit["s_min"] == pytest.approx(100)
    assert fit["b_crit"] == pytest.approx(0.0, abs=1e-9)
    assert math.isnan(fit_front([16], [100.0])["b_crit"])


def synthetic(b_crit=64.0, s_min=100.0):
    """Two lrs per batch size: lr 0.1 reaches the target (loss 1.0) in S(B) steps, lr 1.0 in
    1.5·S(B); the loss falls linearly from 2.0, logged every S/4 steps; B_simple measured with
    tr(Σ) = 10 and |G|² = 0.1 before, 0.05 after half way (pooled 100 before, 200 after)."""
    trials, metrics = [], []
    for b in BATCHES:
        for lr, slow in ((0.1, 1.0), (1.0, 1.5)):
            run_id = f"b{b}-lr{lr}"
            trials.append({"run_id": run_id, "model": "mlp", "family": "sgd", "batch_size": b,
                           "lr": lr, "status": C.FINISHED})
            s = slow * s_min * (1 + b_crit / b)
            for k in range(9):
                step = s * k / 4
                metrics.append((run_id, C.TRAIN_LOSS, step, 2.0 - k / 4))
            for k in range(8):
                step = s * k / 4
                metrics.append((run_id, C.TRACE_SIGMA, step, 10.0))
                metrics.append((run_id, C.GRAD_SQ_UNBIASED, step, 0.1 if k < 4 else 0.05))
    return pd.DataFrame(trials), pd.DataFrame(metrics, columns=["run_id", "key", "step", "value"])


def test_frontier_picks_the_fastest_lr_and_flags_the_grid_edge():
    trials, metrics = synthetic()
    front = frontier(trials, metrics, target=1.0)
    assert list(front["lr"]) == [0.1] * len(BATCHES)
    assert list(front["edge"]) == ["low"] * len(BATCHES)       # the best lr is the smallest
    assert fit_front(front["batch_size"], front["steps"])["b_crit"] == pytest.approx(64.0)
    assert list(front["examples"]) == pytest.approx(list(front["steps"] * front["batch_size"]))


def test_an_lr_counts_only_when_every_seed_reached_the_target():
    trials, metrics = synthetic()
    never = pd.DataFrame([{"run_id": "late", "model": "mlp", "family": "sgd", "batch_size": 16,
                           "lr": 0.1, "status": C.FINISHED}])
    metrics = pd.concat([metrics, pd.DataFrame([("late", C.TRAIN_LOSS, 10.0, 3.0)],
                                               columns=metrics.columns)])
    front = frontier(pd.concat([trials, never]), metrics, target=1.0)
    assert front.loc[front["batch_size"] == 16, "lr"].item() == 1.0


def test_pooled_noise_scale_and_its_growth():
    trials, metrics = synthetic()
    front = frontier(trials, metrics, target=1.0)
    # measurements in [S/2, S]: k = 2, 3 (|G|² 0.1) and 4 (0.05): 10 / mean(0.1, 0.1, 0.05)
    assert pooled_noise_scale_near_target(metrics, front) == pytest.approx(10 / (0.25 / 3))
    assert noise_scale_growth(metrics, list(trials["run_id"])) == pytest.approx(2.0)
