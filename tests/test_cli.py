"""The CLI's small commands: `families` lists what a spec may name, `validate` counts."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_data import _write_mnist_like

from study.cli import main
from study.optim import FAMILIES

ROOT = Path(__file__).resolve().parents[1]


def test_families_lists_every_family_variant_and_typed_option(capsys):
    assert main(["families"]) == 0
    out = capsys.readouterr().out
    for name, cls in FAMILIES.items():
        assert f"{name}: variants {', '.join(cls.variants)}" in out
        for option in cls.Options.model_fields:
            assert f"    {option} = " in out, (name, option)
    assert "damping = float = 0.001 (> 0)" in out          # K-FAC: type, default, bound
    assert "snapshot_unit = 'iter' | 'epoch' = 'epoch'" in out


def test_families_loads_plugin_files(tmp_path, capsys):
    plugin = tmp_path / "toy_family.py"
    plugin.write_text("from study.optim import Optimizer, register\n\n\n@register\n"
                      "class Toy(Optimizer):\n    family, variants = 'toy_cli', ('a', 'b')\n")
    try:
        assert main(["families", "--plugins", str(plugin)]) == 0
        assert "toy_cli: variants a, b (default a)" in capsys.readouterr().out
    finally:
        FAMILIES.pop("toy_cli", None)


def test_validate_prints_the_trial_count(capsys):
    assert main(["validate", str(ROOT / "search_spaces" / "default.yaml")]) == 0
    assert "300 trials (grid search)" in capsys.readouterr().out


def _image_spec(tmp_path, root: Path) -> Path:
    """The shipped sngrad_mnist spec with its data root moved to ``root``."""
    text = (ROOT / "search_spaces" / "sngrad_mnist.yaml").read_text()
    spec = tmp_path / "sngrad_mnist.yaml"
    spec.write_text(text.replace("  root: data\n", f"  root: {root}\n"))
    return spec


def test_has_data_says_skipped_with_the_dataset_and_root_when_files_are_absent(tmp_path,
                                                                              capsys):
    assert main(["has-data", str(_image_spec(tmp_path, tmp_path / "empty"))]) == 1
    out = capsys.readouterr().out
    assert out.startswith(f"skipped sngrad_mnist: mnist not found under dataset.root="
                          f"{tmp_path / 'empty'}")
    assert "dataset.download: true" in out and len(out.splitlines()) == 1


def test_has_data_finds_torchvision_files_and_generated_datasets(tmp_path, capsys):
    _write_mnist_like(tmp_path / "data", "MNIST", np.random.default_rng(0))
    assert main(["has-data", str(_image_spec(tmp_path, tmp_path / "data"))]) == 0
    assert f"mnist found under {tmp_path / 'data'}" in capsys.readouterr().out
    assert main(["has-data", str(ROOT / "search_spaces" / "sngrad_table.yaml")]) == 0
    assert "sngrad_table: mnist1d generated here" in capsys.readouterr().out


def test_make_reproduce_prints_a_line_per_skipped_study_and_still_ends_with_claims(tmp_path):
    """The Makefile's own loop (the venv's stamp taken as made): a study whose data is absent
    is skipped with its line, and the claims step runs on the studies that ran (none here)."""
    if shutil.which("make") is None:
        pytest.skip("no make")
    spaces = tmp_path / "spaces"
    spaces.mkdir()
    _image_spec(spaces, tmp_path / "empty")
    done = subprocess.run(
        ["make", "-s", "-o", ".venv/.install-stamp", "reproduce", f"PY={sys.executable}",
         f"SPACES={spaces}", "REPRODUCE=sngrad_mnist"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("skipped sngrad_mnist: mnist not found under")
    assert lines[-2:] == ["== claims", "no study ran"]
