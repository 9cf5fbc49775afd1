"""Malformed study specs are refused before anything starts, with a message that names the field
and the offending value. Each case starts from one valid spec and breaks exactly one thing."""
from __future__ import annotations

import copy
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from study.spec import SpecError, load_spec, parse_spec

ROOT = Path(__file__).resolve().parents[1]

VALID = {
    "name": "bad-spec-probe",
    "dataset": {"name": "mnist1d", "size": 1000, "val_fraction": 0.1},
    "models": [{"name": "mlp", "widths": [32]}],
    "epochs": 2,
    "seeds": [0],
    "lr": [0.1],
    "batch_size": [32],
    "families": {"sgd": {"variants": ["momentum"], "options": {"momentum": 0.9}}},
    "resources": {"cpu": 1, "gpu": 0},
}


CLAIM = {"name": "sgd_learns", "source": "MNIST-1D paper, Table 1",
         "statistic": "best_test_accuracy", "params": {"family": "sgd"}, "compare": ">",
         "threshold": 50, "figure": "lr_sensitivity"}


def broken(path: str, value) -> dict:
    """VALID with the field at dotted ``path`` set to ``value``."""
    spec = copy.deepcopy(VALID)
    *parents, last = path.split(".")
    node = spec
    for key in parents:
        node = node.setdefault(key, {}) if isinstance(node, dict) else node[int(key)]
    node[last] = value
    return spec


# (case id, dotted path, new value, field the message must name, value text it must show)
CASES = [
    ("unknown top-level field", "colour", "red", "colour", "red"),
    ("unknown nested field", "dataset.colour", "red", "dataset.colour", "red"),
    ("epochs wrong type", "epochs", "ten", "epochs", "ten"),
    ("zero epochs", "epochs", 0, "epochs", "0"),
    ("lr negative", "lr", [-0.1], "lr", "-0.1"),
    ("lr zero", "lr", [0], "lr", "0"),
    ("lr empty list", "lr", [], "lr", "[]"),
    ("lr LogRange high<low", "lr", {"low": 1.0, "high": 0.01, "num": 3}, "lr", "0.01"),
    ("family lr negative", "families.sgd.lr", [0.1, -1.0], "families.sgd.lr", "-1.0"),
    ("empty batch_size", "batch_size", [], "batch_size", "[]"),
    ("batch_size zero", "batch_size", [0], "batch_size", "0"),
    ("batch_size larger than the dataset", "batch_size", [5000], "batch_size", "5000"),
    ("unknown family", "families", {"sgdd": None}, "families", "sgdd"),
    ("empty families", "families", {}, "families", "{}"),
    ("unknown variant", "families.sgd.variants", ["heavy"], "sgd.variants", "heavy"),
    ("unknown option", "families.sgd.options", {"momentun": 0.9}, "sgd.options", "momentun"),
    ("option wrong type", "families.sgd.options", {"momentum": "high"},
     "sgd.options.momentum", "high"),
    ("negative option", "families.sgd.options", {"momentum": -0.5},
     "sgd.options.momentum", "-0.5"),
    ("unknown dataset", "dataset.name", "imagenet", "dataset.name", "imagenet"),
    ("dataset size negative", "dataset.size", -10, "dataset.size", "-10"),
    ("label_noise above 1", "dataset.label_noise", 1.5, "dataset.label_noise", "1.5"),
    ("val_fraction 1", "dataset.val_fraction", 1, "dataset.val_fraction", "1"),
    ("fresh examples of a stored dataset", "dataset.fresh", True, "dataset.fresh", "mnist1d"),
    ("fresh not a boolean", "dataset.fresh", "always", "dataset.fresh", "always"),
    ("augmenting what is not an image", "dataset.augment", True, "dataset.augment", "mnist1d"),
    ("augment not a boolean", "dataset.augment", "sometimes", "dataset.augment", "sometimes"),
    ("fresh examples with label noise", "dataset",
     {"name": "sine2d", "fresh": True, "label_noise": 0.1}, "dataset.label_noise", "0.1"),
    ("unknown model", "models", [{"name": "transformer"}], "models.0.name", "transformer"),
    ("negative model width", "models", [{"name": "mlp", "widths": [32, -4]}],
     "models.0.widths", "-4"),
    ("unknown init", "models.0.init", "xavier", "models.0.init.kind", "xavier"),
    ("normal init without std", "models.0.init", {"kind": "normal"}, "models.0.init.std", "no std"),
    ("normal init std zero", "models.0.init", {"kind": "normal", "std": 0}, "init.std", "0"),
    ("std with another init", "models.0.init", {"kind": "linspace", "std": 0.1}, "init.std", "0.1"),
    ("init not a kind", "models.0.init", 3, "models.0.init", "3"),
    ("resnet on 1-D inputs", "models", [{"name": "resnet20"}], "models", "resnet20"),
    ("unknown activation", "models.0.activation", "gelu", "models.0.activation", "gelu"),
    ("activation of a cnn", "models", [{"name": "cnn", "activation": "tanh"}],
     "models.0.activation", "cnn"),
    ("gpu fraction above 1", "resources.gpu", 1.5, "resources.gpu", "1.5"),
    ("negative cpu", "resources.cpu", -1, "resources.cpu", "-1"),
    ("empty seeds", "seeds", [], "seeds", "[]"),
    ("bad search kind", "search", {"kind": "bayes"}, "search.kind", "bayes"),
    ("bad search mode", "search", {"mode": "maximize"}, "search.mode", "maximize"),
    ("zero optuna samples", "search", {"kind": "optuna", "num_samples": 0},
     "search.num_samples", "0"),
    ("bad scheduler kind", "scheduler", {"kind": "pbt"}, "scheduler.kind", "pbt"),
    ("ASHA reduction factor 1", "scheduler", {"kind": "asha", "reduction_factor": 1},
     "scheduler.reduction_factor", "1"),
    ("negative measure interval", "measure", {"every": -5}, "measure.every", "-5"),
    ("no training examples to evaluate", "evaluate", {"train_examples": 0},
     "evaluate.train_examples", "0"),
    ("negative max_failures", "max_failures", -1, "max_failures", "-1"),
    ("bad name characters", "name", "my study!", "name", "my study!"),
    ("plugin that does not import", "plugins", ["no_such_plugin_mod"], "plugins",
     "no_such_plugin_mod"),
    ("val metric without a validation split", "dataset.val_fraction", 0, "search.metric",
     "val_accuracy"),
    # the study name is a folder name
    ("name ..", "name", "..", "name", "'..'"),
    ("name .", "name", ".", "name", "'.'"),
    ("name starting with .", "name", ".hidden", "name", "'.hidden'"),
    ("name starting with -", "name", "-rf", "name", "'-rf'"),
    ("name with a slash", "name", "a/b", "name", "'a/b'"),
    ("name with a backslash", "name", "a\\b", "name", "'a\\\\b'"),
    ("name going up", "name", "../escape", "name", "'../escape'"),
    ("name with a space", "name", "my study", "name", "'my study'"),
    ("name not ASCII", "name", "étude", "name", "'étude'"),
    ("empty name", "name", "", "name", "''"),
    # search.metric must be one a trial reports
    ("unknown search metric", "search", {"metric": "val_acc"}, "search.metric", "'val_acc'"),
    ("metric only the parent run has", "search", {"metric": "best/val_accuracy"},
     "search.metric", "best/val_accuracy"),
    # the trial limit
    ("max_trials zero", "search", {"max_trials": 0}, "search.max_trials", "0"),
    ("optuna num_samples above max_trials", "search", {"kind": "optuna", "num_samples": 20000},
     "search.max_trials", "20,000"),
    ("grid above max_trials", "seeds", list(range(10_001)), "search.max_trials", "10,001"),
    # learning rates: a number, a list or {low, high, num}; one message per problem
    ("lr scalar zero", "lr", 0, "lr", "(got 0)"),
    ("lr scalar negative", "lr", -0.1, "lr", "(got -0.1)"),
    ("lr text", "lr", "fast", "lr", "(got 'fast')"),
    ("lr 1e-3 read as text", "lr", "1e-3", "lr", "(got '1e-3')"),
    ("lr boolean", "lr", True, "lr", "(got True)"),
    ("lr infinite", "lr", float("inf"), "lr", "(got inf)"),
    ("lr list with text", "lr", [0.1, "x"], "lr.1", "(got 'x')"),
    ("lr nested list", "lr", [[0.1]], "lr.0", "(got [0.1])"),
    ("lr range low zero", "lr", {"low": 0, "high": 1.0, "num": 3}, "lr.low", "(got 0)"),
    ("lr range num fractional", "lr", {"low": 0.1, "high": 1.0, "num": 2.5}, "lr.num",
     "(got 2.5)"),
    ("lr range num zero", "lr", {"low": 0.1, "high": 1.0, "num": 0}, "lr.num", "(got 0)"),
    ("lr range without num", "lr", {"low": 0.1, "high": 1.0}, "lr", "needs num"),
    ("lr range unknown key", "lr", {"low": 0.1, "high": 1.0, "num": 3, "step": 2}, "lr.step",
     "(got 'step')"),
    ("family lr scalar zero", "families.sgd.lr", 0, "families.sgd.lr", "(got 0)"),
    ("family lr empty", "families.sgd.lr", [], "families.sgd.lr", "(got [])"),
    ("family lr text", "families.sgd.lr", "fast", "families.sgd.lr", "(got 'fast')"),
    ("family lr range high<low", "families.sgd.lr", {"low": 1.0, "high": 0.01, "num": 3},
     "families.sgd.lr.high", "(got 0.01)"),
    *[(f"claim: {case}", "claims", [{**CLAIM, **change}], field, value)
      for case, change, field, value in [
          ("unknown statistic", {"statistic": "best_acc"}, "claims.0.statistic", "best_acc"),
          ("missing parameter", {"params": {}}, "claims.0.params", "needs family"),
          ("unknown parameter", {"params": {"family": "sgd", "colour": "red"}},
           "claims.0.params.colour", "red"),
          ("family not in the study", {"params": {"family": "snr"}},
           "claims.0.params.family", "snr"),
          ("bad compare", {"compare": "=>"}, "claims.0.compare", "=>"),
          ("within needs two numbers", {"compare": "within", "threshold": 50},
           "claims.0.threshold", "50"),
          ("threshold not a number", {"threshold": "high"}, "claims.0.threshold", "high"),
          ("unknown figure", {"figure": "scatter"}, "claims.0.figure", "scatter"),
          ("not a variance key", {"statistic": "variance_ratio_late_early",
                                  "params": {"family": "sgd", "estimator": "dir"}},
           "claims.0.params.estimator", "dir"),
          ("not a metric", {"statistic": "rank_correlation",
                            "params": {"x": "test_accuracy", "y": "loss"}},
           "claims.0.params.y", "loss"),
          ("name not plain", {"name": "a/b"}, "claims.0.name", "a/b"),
      ]],
    ("select on test data", "search.select", {"metric": "test_accuracy"},
     "search.select.metric", "test_accuracy"),
    ("select an unknown metric", "search.select", {"metric": "grad_evals"},
     "search.select.metric", "grad_evals"),
    ("select after the last epoch", "search.select", {"metric": "train_loss", "epoch": 3},
     "search.select.epoch", "(got 3)"),
    ("select at epoch 0", "search.select", {"metric": "train_loss", "epoch": 0},
     "search.select.epoch", "0"),
    ("select an unknown field", "search.select", {"metric": "train_loss", "mode": "min"},
     "search.select.mode", "min"),
]


def test_select_at_an_epoch_is_kept_and_needs_an_evaluated_epoch():
    spec = parse_spec(broken("search.select", {"metric": "train_loss", "epoch": 2}))
    assert spec.search.select.key() == "train_loss@2"
    every_two = {**broken("search.select", {"metric": "val_loss", "epoch": 1}),
                 "epochs": 4, "evaluate": {"every": 2}}
    with pytest.raises(SpecError, match=r"search\.select\.epoch.*not an evaluated epoch"):
        parse_spec(every_two)
    no_val = broken("search", {"metric": "train_loss", "mode": "min",
                               "select": {"metric": "val_accuracy"}})
    no_val["dataset"]["val_fraction"] = 0
    with pytest.raises(SpecError, match=r"search\.select\.metric.*validation split"):
        parse_spec(no_val)


def test_the_starting_spec_is_valid():
    spec = parse_spec(copy.deepcopy(VALID))
    assert spec.num_trials() == 1


@pytest.mark.parametrize("case, path, value, field, shown", CASES, ids=[c[0] for c in CASES])
def test_bad_spec_names_field_and_value(case, path, value, field, shown):
    with pytest.raises(SpecError) as err:
        parse_spec(broken(path, value))
    message = str(err.value)
    assert field in message, message
    assert shown in message, message


def test_a_spec_with_claims_is_valid_and_keeps_them():
    spec = parse_spec(broken("claims", [CLAIM, {**CLAIM, "name": "within", "compare": "within",
                                                "threshold": [40, 100]}]))
    assert [c.name for c in spec.claims] == ["sgd_learns", "within"]
    assert spec.claims[1].threshold == [40, 100]


def test_claims_are_checked_against_the_study():
    with pytest.raises(SpecError, match=r"claims\.1\.name: a second claim of that name"):
        parse_spec(broken("claims", [CLAIM, CLAIM]))
    two_models = broken("claims", [CLAIM])
    two_models["models"] = [{"name": "mlp", "widths": [32]}, {"name": "cnn"}]
    with pytest.raises(SpecError, match=r"claims\.0\.params\.model: the study has models cnn, "
                                        "mlp: name one"):
        parse_spec(two_models)
    named = broken("claims", [{**CLAIM, "params": {"family": "sgd", "model": "cnn"}}])
    named["models"] = two_models["models"]
    assert parse_spec(named).claims[0].params["model"] == "cnn"


def test_every_statistic_of_the_contract_is_computed_by_the_analysis():
    """A name a spec may use (study.contract) is a function of analysis.claim_stats, with the
    same parameters: a spec that validates can always be judged."""
    from analysis.claim_stats import STATISTICS
    from study import contract

    assert set(STATISTICS) == set(contract.CLAIM_STATISTICS)
    for name, (required, optional) in contract.CLAIM_STATISTICS.items():
        code = STATISTICS[name].fn.__code__
        assert code.co_varnames[1:code.co_argcount] == required + optional, name


def test_missing_required_field_is_named():
    spec = copy.deepcopy(VALID)
    del spec["epochs"]
    with pytest.raises(SpecError, match=r"epochs: Field required"):
        parse_spec(spec)


def test_spec_that_is_not_a_mapping():
    with pytest.raises(SpecError, match=r"mapping.*got list"):
        parse_spec([1, 2, 3])


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("name: broken\nepochs: [1, 2\nlr: 0.1\n")
    with pytest.raises(SpecError) as err:
        load_spec(path)
    message = str(err.value)
    assert "\n" not in message, message                      # one problem, one line
    assert str(path) in message and "YAML syntax error" in message
    assert "line 3" in message or "line 2" in message, message


def test_yaml_file_with_a_bad_value_names_the_file(tmp_path):
    path = tmp_path / "negative_lr.yaml"
    path.write_text(yaml.safe_dump(broken("lr", [-0.1])))
    with pytest.raises(SpecError) as err:
        load_spec(path)
    assert str(path) in str(err.value) and "-0.1" in str(err.value)


def test_missing_spec_file(tmp_path):
    with pytest.raises(SpecError, match="no such spec file"):
        load_spec(tmp_path / "nope.yaml")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_gpus_asked_of_a_machine_without_any(tmp_path):
    """A study asking for GPUs on a GPU-less machine would leave every trial PENDING forever;
    the sweep must refuse at once, before Ray starts a trial or MLflow records anything."""
    spec = broken("resources.gpu", 0.5)
    spec["tracking"] = {"uri": "sqlite:///mlflow.db"}
    spec["storage"] = "results"
    (tmp_path / "gpu.yaml").write_text(yaml.safe_dump(spec))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_TMPDIR": str(tmp_path / "ray")}
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "study", "sweep", "gpu.yaml"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=120,
                          check=False)
    elapsed = time.monotonic() - start
    assert proc.returncode != 0
    assert "resources.gpu" in proc.stderr and "0.5" in proc.stderr, proc.stderr
    assert elapsed < 60, f"took {elapsed:.0f}s to refuse"
    assert not (tmp_path / "mlflow.db").exists(), "MLflow store written"
    assert not (tmp_path / "results").exists(), "Tune results written"
    assert not (tmp_path / "mlartifacts").exists()


# -- one line per problem ---------------------------------------------------------------------

LR_FORMS = "give a number, a list of numbers > 0, or {low, high, num}"


def problems(raw, source="<spec>") -> list[str]:
    with pytest.raises(SpecError) as err:
        parse_spec(raw, source=source)
    return str(err.value).splitlines()


@pytest.mark.parametrize("case, path, value, field, shown", CASES, ids=[c[0] for c in CASES])
def test_every_line_is_one_self_contained_problem(case, path, value, field, shown):
    """The CLI prints each line as its own ``error:`` line: no header, no indented
    continuation, each line naming the source and a field."""
    for line in problems(broken(path, value), source="study.yaml"):
        assert line.startswith("study.yaml: "), line
        assert line == line.strip() and "invalid spec" not in line, line
        _, field_named, message = line.split(": ", 2)
        assert re.fullmatch(r"[\w.]+", field_named) and message, line


def test_several_problems_are_several_lines():
    raw = broken("epochs", 0)
    raw["batch_size"] = [0]
    raw["colour"] = "red"
    lines = problems(raw, source="s.yaml")
    assert lines == ["s.yaml: epochs: Input should be greater than 0 (got 0)",
                     "s.yaml: batch_size.0: Input should be greater than 0 (got 0)",
                     "s.yaml: colour: Extra inputs are not permitted (got 'red')"]


def test_name_says_what_a_folder_name_may_hold():
    assert problems(broken("name", "..")) == [
        "<spec>: name: must be a plain folder name (letters, digits, _ . -, not starting with "
        ". or -) (got '..')"]


@pytest.mark.parametrize("name", ["default", "my_study", "run-2.v3", "A1", "_private", "x..y"])
def test_plain_folder_names_are_accepted(name):
    assert parse_spec(broken("name", name)).name == name


def test_unknown_metric_lists_what_a_trial_reports():
    from study import contract

    [line] = problems(broken("search", {"metric": "val_acc"}))
    assert line.startswith("<spec>: search.metric: unknown metric 'val_acc'; a trial reports: ")
    for metric in contract.EPOCH_METRICS:
        assert metric in line


@pytest.mark.parametrize("metric", ["train_loss", "test_accuracy", "val_loss", "grad_evals"])
def test_every_reported_metric_is_a_valid_search_metric(metric):
    assert parse_spec(broken("search", {"metric": metric, "mode": "min"})).search.metric == metric


@pytest.mark.parametrize("path", ["lr", "families.sgd.lr"])
@pytest.mark.parametrize("value, message", [
    (0, f"must be > 0 (got 0); {LR_FORMS}"),
    ([0.1, -1.0], f"must be > 0 (got -1.0); {LR_FORMS}"),
    ("fast", f"must be a number (got 'fast'); {LR_FORMS}"),
    ([], "the learning-rate grid is empty (got [])"),
    ({"low": 1.0, "high": 0.01, "num": 3}, "must be >= low (1.0) (got 0.01)"),
], ids=["zero", "negative in a list", "text", "empty list", "high below low"])
def test_one_clear_lr_message_per_problem(path, value, message):
    """No union noise (``LogRange``, ``list[...]``): one line naming what is allowed."""
    [line] = problems(broken(path, value))
    assert line.startswith(f"<spec>: {path}"), line
    assert line.endswith(message), line
    assert "LogRange" not in line and "list[" not in line and "Input should" not in line


def test_lr_zero_message_in_full():
    assert problems(broken("lr", 0)) == [f"<spec>: lr: must be > 0 (got 0); {LR_FORMS}"]


def test_lr_written_1e_minus_3_says_how_to_write_it():
    [line] = problems(broken("lr", "1e-3"))
    assert "(got '1e-3')" in line and "1.0e-3" in line
    assert yaml.safe_load("lr: 1.0e-3")["lr"] == 0.001


def test_no_lr_for_a_family_names_the_family():
    raw = copy.deepcopy(VALID)
    del raw["lr"]
    raw["families"]["adam"] = {"lr": 0.001}
    assert problems(raw) == ["<spec>: families.sgd.lr: no learning rates for family sgd: set lr "
                             "at the top level or families.sgd.lr"]
