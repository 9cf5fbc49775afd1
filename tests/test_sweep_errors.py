"""A sweep refuses what it cannot use before anything starts: a storage folder it cannot
write, a tracking store it cannot open, a changed spec over a stored sweep. Each is one
``error:`` line naming the field and the file, exit status 2, no traceback, no Ray runtime
started and no MLflow run left RUNNING."""
from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import pytest
import yaml
from sweep_store import run_sweep


def write_spec(folder: Path, **overrides) -> Path:
    spec = {"name": "errs", "dataset": {"name": "mnist1d", "size": 600,
                                        "root": str(folder / "data")},
            "models": [{"name": "mlp", "widths": [8]}], "epochs": 1, "lr": 0.1,
            "batch_size": [32], "families": {"sgd": None},
            "measure": {"every": 0, "histograms": False}}
    spec.update(overrides)
    path = folder / "errs.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def refused(proc, *needles: str) -> str:
    """The one error line, after checking rc 2 and no traceback."""
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1, lines
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


def test_storage_that_cannot_be_written(tmp_path, short_tmp):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    spec = write_spec(tmp_path, storage=str(blocker / "results"))
    line = refused(run_sweep(tmp_path, spec, ray_tmp=short_tmp), "storage:", str(blocker))
    assert "cannot write" in line
    assert not (tmp_path / "mlflow.db").exists(), "the tracking store was opened"
    assert not list(short_tmp.iterdir()), "a Ray runtime was started"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_storage_in_a_read_only_folder(tmp_path, short_tmp):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    spec = write_spec(tmp_path, storage=str(locked / "results"))
    refused(run_sweep(tmp_path, spec, ray_tmp=short_tmp), "storage:", str(locked))


def a_store(db: Path) -> None:
    """A real MLflow store with the study's experiment in it."""
    from mlflow.tracking import MlflowClient

    MlflowClient(f"sqlite:///{db}").create_experiment("errs")


@pytest.mark.parametrize("damage", ["truncated", "not_a_database"])
def test_tracking_store_that_cannot_be_opened_names_the_file(tmp_path, short_tmp, damage):
    db = tmp_path / "mlflow.db"
    if damage == "truncated":
        a_store(db)
        db.write_bytes(db.read_bytes()[: db.stat().st_size // 3])
    else:
        db.write_bytes(b"these are not the pages of a database\n" * 100)
    before = db.read_bytes()
    spec = write_spec(tmp_path)
    refused(run_sweep(tmp_path, spec, ray_tmp=short_tmp), "tracking.uri:", str(db))
    assert db.read_bytes() == before, "the damaged store was written to"
    assert not (tmp_path / "results").exists() or not any((tmp_path / "results").iterdir())
    assert not list(short_tmp.iterdir()), "a Ray runtime was started"


def test_tracking_store_in_a_missing_folder(tmp_path, short_tmp):
    spec = write_spec(tmp_path)
    missing = tmp_path / "no" / "such" / "folder"
    proc = run_sweep(tmp_path, spec, "--tracking-uri", f"sqlite:///{missing}/mlflow.db",
                     ray_tmp=short_tmp)
    refused(proc, "tracking.uri:", str(missing))


@pytest.mark.slow
def test_changed_spec_says_how_to_start_over_and_leaves_nothing_running(tmp_path, short_tmp):
    spec = write_spec(tmp_path)
    first = run_sweep(tmp_path, spec, "--no-report", ray_tmp=short_tmp)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    write_spec(tmp_path, epochs=2)
    line = refused(run_sweep(tmp_path, spec, ray_tmp=short_tmp), str(spec), "spec changed")
    assert "FRESH=1" in line and "--fresh" in line
    with sqlite3.connect(tmp_path / "mlflow.db") as db:
        assert db.execute("SELECT COUNT(*) FROM runs WHERE status = 'RUNNING'").fetchone() == (0,)
        assert db.execute("SELECT COUNT(*) FROM runs").fetchone() == (2,), "parent + 1 trial"
    other = f"sqlite:///{tmp_path / 'other.db'}"
    line = refused(run_sweep(tmp_path, write_spec(tmp_path), "--tracking-uri", other,
                             ray_tmp=short_tmp), "tracking.uri:", "other.db")
    assert not (tmp_path / "other.db").exists()


def test_missing_image_dataset_names_the_root_and_starts_nothing(tmp_path, short_tmp):
    """The data is read before the tracking store is opened and Ray starts beside it: a missing
    dataset leaves no store, no results and no Ray runtime behind."""
    empty = tmp_path / "no-images"
    empty.mkdir()
    spec = write_spec(tmp_path, dataset={"name": "mnist", "root": str(empty)})
    refused(run_sweep(tmp_path, spec, ray_tmp=short_tmp), "dataset.name: mnist",
            f"dataset.root={empty}")
    assert not (tmp_path / "mlflow.db").exists(), "the tracking store was opened"
    assert not (tmp_path / "results").exists() or not any((tmp_path / "results").iterdir())
    assert not list(short_tmp.iterdir()), "a Ray runtime was started"
