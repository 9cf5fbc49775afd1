"""Malformed study specs are refused before anything starts, with a message that names the field
and the offending value. Each case starts from one valid spec and breaks exactly one thing."""
from __future__ import annotations

import copy
import os
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
    ("unknown model", "models", [{"name": "transformer"}], "models.0.name", "transformer"),
    ("negative model width", "models", [{"name": "mlp", "widths": [32, -4]}],
     "models.0.widths", "-4"),
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
    ("negative max_failures", "max_failures", -1, "max_failures", "-1"),
    ("bad name characters", "name", "my study!", "name", "my study!"),
    ("plugin that does not import", "plugins", ["no_such_plugin_mod"], "plugins",
     "no_such_plugin_mod"),
    ("val metric without a validation split", "dataset.val_fraction", 0, "search.metric",
     "val_accuracy"),
]


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
