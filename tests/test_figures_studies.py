"""The reproduction studies' figures draw what they are given and say why when they cannot:
the estimators figure one line per estimator found (shadows included), the critical-batch
front its points, the fit and B_simple, on runs with chosen answers."""
from __future__ import annotations

import pandas as pd
from test_critical_batch import synthetic

from analysis.figures_studies import (
    critical_batch_front,
    critical_batch_targets,
    estimator_curves,
    estimators_of,
)


def test_critical_batch_front_draws_points_fit_and_b_simple(tmp_path):
    trials, metrics = synthetic()
    result = critical_batch_front(trials, metrics, [("sgd", 1.0)], tmp_path)
    assert result.path.exists() and result.n_series == 2 and result.n_marked == 1
    assert critical_batch_front(trials, metrics, [], tmp_path).path is None


def test_targets_come_from_the_critical_batch_claims():
    claims = [{"statistic": "noise_scale_growth", "params": {"family": "sgd", "target": 1}},
              {"statistic": "critical_batch_over_noise_scale",
               "params": {"family": "sgd", "target": 1.0}},
              {"statistic": "best_test_accuracy", "params": {"family": "sgd"}}]
    assert critical_batch_targets(claims) == [("sgd", 1.0)]


def test_estimator_curves_draw_every_estimator_on_one_trajectory(tmp_path):
    rows = []
    for name in ("dir", "sgd", "sgd_2b", "svrg", "gc"):
        for stat in ("var", "nvar"):
            for step in (0, 10, 20):
                key = f"var/{name}_{stat}"
                rows += [("r0", key, step, 1.0 + step), ("r1", key, step, 5.0)]
    metrics = pd.DataFrame(rows, columns=["run_id", "key", "step", "value"])
    assert estimators_of(metrics) == ["dir", "sgd", "gc", "sgd_2b", "svrg"]
    best = pd.DataFrame([{"model": "mlp", "family": "sgd", "lr": 0.1, "batch_size": 128,
                          "run_ids": ["r0", "r1"]}])
    result = estimator_curves(metrics, best, tmp_path)
    assert result.path.exists() and result.n_series == 10      # 5 estimators x 2 statistics
    plain = metrics[metrics["key"].str.fullmatch(r"var/(dir|sgd)_n?var")]
    assert estimator_curves(plain, best, tmp_path).path is None
