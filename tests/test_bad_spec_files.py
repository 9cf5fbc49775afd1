"""Specs refused for their size (the trial limit, counted without listing the trials) and files
that are not specs at all: each an error that names the field or the file, before anything
starts. The valid starting spec and the helpers are test_bad_specs.py's."""
from __future__ import annotations

import copy
import subprocess
import sys
import time

import pytest
import yaml
from test_bad_specs import ROOT, VALID, broken, problems

from study.spec import SpecError, load_spec, parse_spec

# -- the trial limit ----------------------------------------------------------------------------

def million_trials(how: str) -> dict:
    raw = copy.deepcopy(VALID)
    raw["dataset"]["size"] = 5000                       # 3,600 training examples
    if how == "lr x batch size":
        raw["lr"] = {"low": 1e-4, "high": 1.0, "num": 1000}
        raw["batch_size"] = list(range(1, 1001))
    else:                                               # 1,000 x 1,000 option combinations
        raw["families"]["sgd"]["options"] = {
            "momentum": [i / 1000 for i in range(1000)],
            "weight_decay": [i * 1e-6 for i in range(1000)]}
    return raw


@pytest.mark.parametrize("how", ["lr x batch size", "option grids"])
def test_a_million_trial_grid_is_refused_at_once(how):
    """Counted, not listed, and before any model is built for an arm."""
    parse_spec(copy.deepcopy(VALID))                    # imports warm
    start = time.perf_counter()
    lines = problems(million_trials(how))
    elapsed = time.perf_counter() - start
    assert lines == ["<spec>: search.max_trials: the grid has 1,000,000 trials, above the limit "
                     "of 10,000 (raise search.max_trials to run it)"]
    assert elapsed < 2.0, f"took {elapsed:.1f}s to refuse"


def test_an_optuna_space_of_a_million_arms_is_refused_at_once():
    raw = million_trials("option grids")
    raw["search"] = {"kind": "optuna", "num_samples": 50}
    start = time.perf_counter()
    [line] = problems(raw)
    assert time.perf_counter() - start < 2.0
    assert line.startswith("<spec>: search.max_trials: ") and "1,000,000 arms" in line


def test_an_optuna_lr_grid_too_long_to_list_is_refused_at_once():
    raw = broken("search", {"kind": "optuna"})
    raw["lr"] = {"low": 1e-4, "high": 1.0, "num": 10**9}
    start = time.perf_counter()
    [line] = problems(raw)
    assert time.perf_counter() - start < 2.0
    assert "search.max_trials" in line and "1,000,000,000" in line


def test_raising_max_trials_lets_a_large_grid_through_and_counts_it():
    raw = million_trials("lr x batch size")
    raw["search"] = {"max_trials": 1_000_000}
    start = time.perf_counter()
    spec = parse_spec(raw)
    assert spec.num_trials() == 1_000_000
    assert time.perf_counter() - start < 2.0


def test_max_trials_defaults_to_ten_thousand():
    assert parse_spec(copy.deepcopy(VALID)).search.max_trials == 10_000


# -- files that are not specs ---------------------------------------------------------------------

@pytest.mark.parametrize("content", [
    b"\x00\xff\xfe\x01\x02binary",
    b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x10",
    b"name: x\x00\nepochs: 1\n",
    b"name: x\x01\n",
], ids=["binary", "png", "nul byte", "control character"])
def test_a_binary_file_is_not_a_spec(tmp_path, content):
    path = tmp_path / "spec.yaml"
    path.write_bytes(content)
    with pytest.raises(SpecError) as err:
        load_spec(path)
    message = str(err.value)
    assert message.startswith(f"{path}: not a text (YAML) file"), message
    assert "\n" not in message


def test_a_folder_is_not_a_spec(tmp_path):
    with pytest.raises(SpecError) as err:
        load_spec(tmp_path)
    assert str(err.value) == f"{tmp_path}: is a folder, not a spec file"


def test_an_empty_file_is_not_a_spec(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("")
    with pytest.raises(SpecError, match="empty"):
        load_spec(path)


def test_a_spec_file_with_a_byte_order_mark_loads(tmp_path):
    path = tmp_path / "bom.yaml"
    path.write_bytes(b"\xef\xbb\xbf" + yaml.safe_dump(VALID).encode())
    assert load_spec(path).name == VALID["name"]


def test_validate_on_a_binary_file_is_an_error_line_not_a_traceback(tmp_path):
    path = tmp_path / "picture.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    proc = subprocess.run([sys.executable, "-m", "study", "validate", str(path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert f"{path}: not a text (YAML) file" in proc.stderr
