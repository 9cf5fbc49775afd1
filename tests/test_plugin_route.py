"""The plugin route as README documents it: README's example family, copied verbatim into a
folder outside the package, named by a spec as a file, runs a study through the CLI (the
driver validates it, the Ray trial workers import it and train with it)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from sweep_store import SqlStore, run_sweep

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_example() -> tuple[str, str]:
    """(relative path, code) of README's plugin example: the python block whose first line
    is a comment naming its file."""
    for block in re.findall(r"```python\n(.*?)```", README.read_text(), re.S):
        first = block.splitlines()[0]
        match = re.match(r"# (\S+\.py)\b", first)
        if match and "@register" in block:
            return match.group(1), block
    raise AssertionError("README has no plugin example (a python block starting '# x.py')")


def registered_family(plugin: Path):
    """(name, class) of the family a plugin file registers, imported here as the driver
    would; unregistered again, so this process's registry stays as it was."""
    from study.optim import FAMILIES
    from study.plugins import import_plugin

    before = set(FAMILIES)
    import_plugin(str(plugin))
    (family,) = set(FAMILIES) - before
    return family, FAMILIES.pop(family)


def test_readme_example_is_short_and_registers_a_family(tmp_path):
    path, code = readme_example()
    assert len(code.strip().splitlines()) <= 20, "the example stays short"
    plugin = tmp_path / Path(path).name
    plugin.write_text(code)
    _, cls = registered_family(plugin)
    assert cls.variants and "eps" in cls.Options.model_fields


@pytest.mark.slow
def test_plugin_file_outside_the_package_runs_a_study(tmp_path, short_tmp):
    path, code = readme_example()
    plugin = tmp_path / "elsewhere" / path
    plugin.parent.mkdir(parents=True)
    plugin.write_text(code)
    family, _ = registered_family(plugin)
    spec = {"name": "plugin_route", "dataset": {"name": "mnist1d", "size": 600,
                                                "root": str(tmp_path / "data")},
            "models": [{"name": "mlp", "widths": [16]}], "epochs": 2,
            "lr": [0.001, 0.003], "batch_size": [32], "families": {family: None},
            "plugins": [path], "measure": {"every": 5, "batches": 2, "histograms": False}}
    spec_file = plugin.parents[len(Path(path).parts) - 1] / "study.yaml"
    spec_file.write_text(yaml.safe_dump(spec))
    # run from another folder: the plugin is found relative to the spec file, not the cwd
    run_in = tmp_path / "run"
    run_in.mkdir()
    proc = run_sweep(run_in, spec_file, ray_tmp=short_tmp)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    store = SqlStore(run_in / "mlflow.db")
    (parent, status), = store.parents("plugin_route")
    children = store.children(parent)
    assert status == "FINISHED" and len(children) == 2
    for run_id, child in children.items():
        assert child["params"]["family"] == family and child["status"] == "finished", child
        losses = [v for _, v in store.history(run_id, "train_loss")]
        assert losses[-1] < losses[0], f"the plugin's steps did not train: {losses}"
