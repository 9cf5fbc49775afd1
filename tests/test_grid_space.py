"""A grid study's Tune space: one axis of short keys ("<index>:<arm>") and each trial's point
looked up from its key, so Tune's per-trial copy of the space does not copy every point."""
from __future__ import annotations

import copy
from types import SimpleNamespace

from study.search import GRID_KEY, GridPoint, searcher, trial_dirname
from study.spec import parse_spec


def grid_spec():
    return parse_spec({
        "name": "g", "dataset": {"name": "sine2d", "size": 200},
        "models": [{"name": "mlp", "widths": [4]}], "epochs": 1, "seeds": [0, 1],
        "lr": [0.1, 0.2], "batch_size": [50],
        "families": {"sgd": {"variants": ["plain", "momentum"], "options": {"momentum": 0.9}}},
        "measure": {"points": 0}})


def test_every_trial_gets_its_own_point_in_the_grid_order():
    from ray.tune.search.variant_generator import generate_variants

    spec = grid_spec()
    _, space, samples = searcher(spec)
    assert samples == 1
    # Tune sets a sample_from aside (a placeholder) and resolves it when it adds the trial
    axis = {GRID_KEY: space[GRID_KEY]}
    points = [v["config"] for _, v in generate_variants({"config": axis})]
    for config in points:
        config["trial"] = space["trial"].func(config)
    assert [c["trial"] for c in points] == spec.trials()
    assert [c[GRID_KEY] for c in points] == [f"{i}:{p['arm']}"
                                             for i, p in enumerate(spec.trials())]


def test_the_space_copies_keys_not_points():
    spec = grid_spec()
    _, space, _ = searcher(spec)
    assert all(isinstance(k, str) for k in space[GRID_KEY]["grid_search"])
    assert isinstance(space["trial"].func, GridPoint)
    assert copy.deepcopy(space)[GRID_KEY] == space[GRID_KEY]


def test_a_trial_folder_is_named_by_its_arm_before_its_point_is_looked_up():
    unresolved = SimpleNamespace(config={GRID_KEY: "3:mlp/sgd/momentum",
                                         "trial": ("__fn_ph", "abc")}, trial_id="t1")
    assert trial_dirname(unresolved) == "mlp_sgd_momentum_t1"
    stored = SimpleNamespace(config={"trial": {"arm": "cnn/adam/default"}}, trial_id="t2")
    assert trial_dirname(stored) == "cnn_adam_default_t2"      # a sweep stored before
    optuna = SimpleNamespace(config={"arm": "mlp/gc/online", "batch_size": 32}, trial_id="t3")
    assert trial_dirname(optuna) == "mlp_gc_online_t3"
