"""Claim statistics about speed to a target loss, on runs whose answer is chosen: an exact
S–E front with B_crit = 64 and a pooled B_simple of 120 (ratio 0.533); a noise scale that
doubles half way through every run; a variance statistic that ranks the runs' speed exactly
against one that does not."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from test_critical_batch import synthetic

from analysis.claim_stats import STATISTICS, Context, Missing
from study import contract as C


def context(trials, metrics):
    return Context(trials.assign(dataset="mnist1d"), metrics)


def test_critical_batch_over_noise_scale_on_an_exact_front():
    ctx = context(*synthetic())
    est = STATISTICS["critical_batch_over_noise_scale"].fn(ctx, target=1.0, family="sgd")
    assert est.value == pytest.approx(64 / 120)
    assert est.low == pytest.approx(64 / 120) and est.high == pytest.approx(64 / 120)
    with pytest.raises(Missing, match="reached training loss -1"):
        STATISTICS["critical_batch_over_noise_scale"].fn(ctx, target=-1.0, family="sgd")


def test_noise_scale_growth_finds_the_doubling():
    ctx = context(*synthetic())
    est = STATISTICS["noise_scale_growth"].fn(ctx, target=1.0, family="sgd")
    assert est.value == pytest.approx(2.0) and est.n == 7


def speed_runs(n=12, seed=0):
    """Run i reaches loss 1.0 at step 100·(i+1); var/sgd_nvar = its steps (a perfect rank
    predictor), var/sgd_var random. Two more runs never reach the target."""
    rng = np.random.default_rng(seed)
    trials, metrics = [], []
    for i in range(n + 2):
        run_id = f"r{i}"
        trials.append({"run_id": run_id, "model": "mlp", "family": "sgd", "batch_size": 32,
                       "lr": 0.01 * (i + 1), "status": C.FINISHED})
        reach = 100.0 * (i + 1) if i < n else 1e9
        for step in (0.0, 50.0 * n * 4):
            metrics.append((run_id, C.TRAIN_LOSS, step, 2.0 - step / reach))
        for step in (10.0, 20.0):
            metrics.append((run_id, "var/sgd_nvar", step, float(min(reach, 1e6))))
            metrics.append((run_id, "var/sgd_var", step, float(rng.random())))
    return pd.DataFrame(trials), pd.DataFrame(metrics, columns=["run_id", "key", "step", "value"])


def test_speed_prediction_advantage_ranks_the_faithful_statistic_first():
    ctx = context(*speed_runs())
    fn = STATISTICS["speed_prediction_advantage"].fn
    est = fn(ctx, better="sgd_nvar", worse="sgd_var", target=1.0, family="sgd")
    assert 0 < est.value <= 1 and est.low > 0               # |ρ| = 1 against a random one
    swapped = fn(ctx, better="sgd_var", worse="sgd_nvar", target=1.0, family="sgd")
    assert swapped.value == pytest.approx(-est.value) and swapped.high < 0


def test_every_statistic_in_the_contract_has_a_function():
    assert set(STATISTICS) == set(C.CLAIM_STATISTICS)


def test_largest_logged_and_the_generalization_gap():
    """Two families, three seeds: sgd's gaps (train − test) are 10, 12, 14 points, well_tempered's
    4, 5, 6: the paired difference is −7 points; the span series peaks at 7, 8, 9."""
    trials, rows = [], []
    for fam, gaps in (("sgd", (0.10, 0.12, 0.14)), ("well_tempered", (0.04, 0.05, 0.06))):
        for seed, gap in enumerate(gaps):
            run_id = f"{fam}{seed}"
            trials.append({"run_id": run_id, "model": "mlp", "family": fam, "batch_size": 32,
                           "lr": 0.1, "seed": seed, "status": C.FINISHED, "variant": "v",
                           "arm": f"mlp/{fam}/v", C.VAL_ACCURACY: 0.8,
                           C.TRAIN_ACCURACY: 0.9, C.TEST_ACCURACY: 0.9 - gap})
            rows += [(run_id, C.GRAD_LOG10_SPAN, step, 5.0 + seed + 2 * (step == 5))
                     for step in (0, 5, 9)]
    ctx = context(pd.DataFrame(trials), pd.DataFrame(rows, columns=["run_id", "key", "step",
                                                                    "value"]))
    gap = STATISTICS["generalization_gap_difference"].fn(ctx, family="well_tempered")
    assert gap.value == pytest.approx(-7.0) and gap.high < 0
    span = STATISTICS["largest_logged"].fn(ctx, key=C.GRAD_LOG10_SPAN, family="sgd")
    assert span.value == pytest.approx(8.0) and span.n == 3
