"""The CLI's small commands: `families` lists what a spec may name, `validate` counts."""
from __future__ import annotations

from pathlib import Path

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
    assert "240 trials (grid search)" in capsys.readouterr().out
