"""End to end: `python -m study sweep` on a tiny study, on a real local Ray runtime, logged to
a real sqlite MLflow store, ending in the first report."""
import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

ROOT = Path(__file__).resolve().parents[1]

SPEC = """
name: e2e
dataset: {{name: mnist1d, size: 800, root: {root}}}
models: [{{name: mlp, widths: [16]}}]
epochs: 3
lr: [0.05, 0.5]
batch_size: [32]
families:
  sgd: {{variants: [momentum]}}
  adam: {{lr: [0.003]}}
measure: {{every: 10, batches: 3, histograms: true, histogram_points: 3}}
"""


def sweep(cwd: Path, spec: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_DEDUP_LOGS": "0"}
    return subprocess.run([sys.executable, "-m", "study", "sweep", str(spec), *extra], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_tiny_study_end_to_end(tmp_path):
    spec = tmp_path / "e2e.yaml"
    spec.write_text(SPEC.format(root=tmp_path / "data"))
    proc = sweep(tmp_path, spec)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("e2e")
    parents = client.search_runs([exp.experiment_id], "tags.`gradstudy.kind` = 'study'")
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    children = client.search_runs([exp.experiment_id],
                                  f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert len(children) == 3, "one child run per trial (2 sgd lrs + 1 adam lr)"
    seen = set()
    for run in children:
        p, tags = run.data.params, run.data.tags
        seen.add((p["family"], float(p["lr"])))
        assert p["batch_size"] == "32" and p["model"] == "mlp" and p["seed"] == "0"
        assert tags["status"] in ("finished", "diverged") and tags["family"] == p["family"]
        history = client.get_metric_history(run.info.run_id, "test_accuracy")
        if tags["status"] == "finished":
            assert [m.step for m in history] == [18, 36, 54]  # 640 train - 64 val = 576 = 18·32
        variance = client.get_metric_history(run.info.run_id, "var/dir_var")
        assert variance and all(m.value >= 0 for m in variance)
        artifacts = [a.path for a in client.list_artifacts(run.info.run_id)]
        assert "grad_hist.json" in artifacts
    assert seen == {("sgd", 0.05), ("sgd", 0.5), ("adam", 0.003)}
    assert (tmp_path / "mlartifacts").is_dir() and not (tmp_path / "mlruns").exists()

    report = tmp_path / "reports" / "e2e"
    assert (report / "summary.md").read_text().strip()
    rows = list(csv.DictReader((report / "summary.csv").open()))
    assert {r["family"] for r in rows} == {"sgd", "adam"}
    assert (report / "index.html").exists()

    # Running the same command again resumes the finished study: nothing is rerun or duplicated.
    again = sweep(tmp_path, spec)
    assert again.returncode == 0, again.stderr[-3000:]
    children_again = client.search_runs([exp.experiment_id],
                                        f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert len(children_again) == 3
    for run in children_again:
        history = client.get_metric_history(run.info.run_id, "epoch")
        assert len(history) == len({m.step for m in history})


@pytest.mark.slow
def test_a_relative_data_root_is_the_sweep_folders_not_each_trials(tmp_path):
    """Tune runs each trial in a folder of its own: a relative ``dataset.root`` must still name
    the folder the sweep was started in (MNIST files written in torchvision's format there;
    before the fix every trial failed to find them, and MNIST-1D was generated again in each
    worker's trial folder)."""
    import numpy as np
    from test_data import _write_mnist_like

    _write_mnist_like(tmp_path / "data", "MNIST", np.random.default_rng(0), n_train=64,
                      n_test=16)
    spec = tmp_path / "rel.yaml"
    spec.write_text("name: rel\ndataset: {name: mnist, root: data}\n"
                    "models: [{name: mlp, widths: [8]}]\nepochs: 1\nlr: [0.1]\n"
                    "batch_size: [16]\nfamilies: {sgd: {}}\n")
    proc = sweep(tmp_path, spec, "--no-report")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("rel").experiment_id],
                                "tags.`gradstudy.kind` = 'trial'")
    assert run.data.tags["status"] == "finished", run.data.tags
