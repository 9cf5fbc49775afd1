"""Spec resolution: grids, per-family overrides, the validate command. (Malformed specs are in
test_bad_specs.py.)"""
import subprocess
import sys
from pathlib import Path

import pytest

from study.spec import SpecError, load_spec, parse_spec

ROOT = Path(__file__).resolve().parents[1]


def base(**over):
    raw = {"name": "s", "dataset": {"name": "mnist1d"}, "models": [{"name": "mlp"}],
           "epochs": 1, "lr": [0.1, 0.01], "batch_size": [32, 64],
           "families": {"sgd": {"variants": ["plain", "momentum"]}, "adam": {"lr": [1e-3]}}}
    raw.update(over)
    return raw


def test_grid_is_arms_times_family_lr_times_batch_times_seed():
    spec = parse_spec(base(seeds=[0, 1]))
    # sgd: 2 variants × 2 lr; adam: 1 variant × its own 1 lr; × 2 batch sizes × 2 seeds
    assert spec.num_trials() == (2 * 2 + 1) * 2 * 2
    assert {t["lr"] for t in spec.trials() if t["family"] == "adam"} == {1e-3}
    assert len({(t["arm"], t["lr"], t["batch_size"], t["seed"]) for t in spec.trials()}) == 20


def test_option_lists_are_grids_and_label_the_arm():
    spec = parse_spec(base(families={"sgd": {"variants": ["momentum"],
                                             "options": {"momentum": [0.5, 0.9]}}}))
    arms = sorted(a["arm"] for a in spec.arms())
    assert arms == ["mlp/sgd/momentum[momentum=0.5]", "mlp/sgd/momentum[momentum=0.9]"]


def test_log_range_and_optuna_count():
    spec = parse_spec(base(lr={"low": 1e-3, "high": 1.0, "num": 4},
                           search={"kind": "optuna", "num_samples": 7}))
    assert spec.lr_grid("sgd") == pytest.approx([1e-3, 1e-2, 1e-1, 1.0])
    assert spec.num_trials() == 7


def test_two_models_of_one_kind_get_distinct_labels():
    spec = parse_spec(base(models=[{"name": "mlp", "widths": [8]}, {"name": "mlp", "widths": [16]}],
                           families={"sgd": None}))
    assert {a["arm"] for a in spec.arms()} == {"mlp0/sgd/momentum", "mlp1/sgd/momentum"}


def test_every_shipped_spec_is_valid():
    for path in (ROOT / "search_spaces").glob("*.yaml"):
        assert load_spec(path).num_trials() > 0, path


def test_validate_command_prints_trials_or_names_the_field(tmp_path):
    run = lambda f: subprocess.run([sys.executable, "-m", "study", "validate", str(f)],
                                   capture_output=True, text=True, cwd=ROOT)
    ok = run(ROOT / "search_spaces" / "default.yaml")
    assert ok.returncode == 0 and "trials" in ok.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: b\ndataset: {name: mnist1d}\nmodels: [{name: mlp}]\nepochs: 0\n"
                   "lr: [0.1]\nbatch_size: [8]\nfamilies: {sgd: null}\n")
    out = run(bad)
    assert out.returncode == 2 and "epochs" in out.stderr and "0" in out.stderr


def test_missing_file_is_a_spec_error(tmp_path):
    with pytest.raises(SpecError, match="no such spec file"):
        load_spec(tmp_path / "nope.yaml")


def test_option_values_a_family_rejects_fail_at_validation():
    with pytest.raises(SpecError, match=r"families\.svrg\.options\.snapshot_unit: .*weeks"):
        parse_spec(base(families={"svrg": {"options": {"snapshot_unit": "weeks"}}}))


def test_a_single_learning_rate_is_a_one_value_grid():
    spec = parse_spec(base(lr=0.1, families={"sgd": None, "adam": {"lr": 3e-4}}))
    assert spec.lr_grid("sgd") == [0.1]
    assert spec.lr_grid("adam") == [3e-4]
    assert spec.num_trials() == 2 * 2


def test_top_level_lr_is_optional_when_every_family_sets_its_own():
    raw = base(families={"sgd": {"lr": [0.1, 0.01]}, "adam": {"lr": {"low": 1e-4, "high": 1e-2,
                                                                     "num": 3}}})
    del raw["lr"]
    spec = parse_spec(raw)
    assert spec.lr is None
    assert spec.lr_grid("sgd") == [0.1, 0.01]
    assert spec.lr_grid("adam") == pytest.approx([1e-4, 1e-3, 1e-2])
    assert {t["family"] for t in spec.trials()} == {"sgd", "adam"}


def test_num_trials_counts_exactly_what_trials_lists():
    """Counted arithmetically (a million-trial grid is refused without listing it), so the
    count must agree with the list on every kind of grid: option grids, families with their
    own lr grids (a list, a range, a number), the default variant, several models and seeds."""
    spec = parse_spec(base(
        models=[{"name": "mlp", "widths": [8]}, {"name": "mlp", "widths": [16]},
                {"name": "cnn", "channels": [4]}],
        seeds=[0, 1, 2],
        lr={"low": 0.01, "high": 1.0, "num": 3},
        batch_size=[16, 32],
        families={"sgd": {"variants": ["plain", "momentum"],
                          "options": {"momentum": [0.5, 0.9], "weight_decay": [0.0, 1e-4, 1e-3]}},
                  "adam": {"lr": [1e-3, 3e-3]},
                  "snr": {"variants": ["I", "II"], "lr": 0.1, "options": {"alpha": [0.5, 1.0]}},
                  "svrg": None}))
    per_model = 2 * 2 * 3 * 3 + 1 * 2 + 2 * 2 * 1 + 1 * 3
    assert spec.num_trials() == 3 * per_model * 2 * 3 == len(spec.trials())
    assert spec.num_arms() == len(spec.arms())
    assert len({(t["arm"], t["lr"], t["batch_size"], t["seed"]) for t in spec.trials()}) \
        == spec.num_trials()


def test_every_shipped_spec_counts_what_it_lists():
    for path in (ROOT / "search_spaces").glob("*.yaml"):
        spec = load_spec(path)
        if spec.search.kind == "grid":
            assert spec.num_trials() == len(spec.trials()), path


def test_a_spec_survives_its_own_dump():
    spec = parse_spec(base(lr=0.1, families={"sgd": None, "adam": {"lr": {"low": 1e-4,
                                                                         "high": 1e-2, "num": 3}}}))
    assert parse_spec(spec.model_dump()) == spec


def test_model_init_and_activation_reach_the_trial():
    """The notebook's 2-20-20-2 tanh MLP with its bad init, and He-normal, as a spec writes
    them: the options are what build_model gets, and what MLflow records as model.*."""
    spec = parse_spec(base(dataset={"name": "sine2d"}, models=[
        {"name": "mlp", "widths": [20, 20], "activation": "tanh", "init": "linspace"},
        {"name": "mlp", "init": {"kind": "normal", "std": 0.01}},
        {"name": "mlp", "init": "he_normal"}]))
    options = [a["model_options"] for a in spec.arms() if a["family"] == "adam"]
    assert options == [{"widths": [20, 20], "activation": "tanh", "init": "linspace"},
                       {"init": {"kind": "normal", "std": 0.01}}, {"init": "he_normal"}]
    config = spec.trial_config(spec.trials()[0])
    assert config.params()["model.init"] == "linspace"
    assert parse_spec(spec.model_dump()) == spec
