"""Every search kind × every scheduler, end to end through the CLI as a user runs it: a tiny
real study on a local Ray runtime, then the MLflow store read back with plain SQL: one parent,
one child per trial, each child's status what happened to it, nothing left RUNNING, a report.
Plus an Optuna + ASHA sweep interrupted with Ctrl-C and resumed."""
from __future__ import annotations

import math
import signal
import time
from pathlib import Path

import pytest
import yaml
from sweep_store import SqlStore, kill_group, run_sweep, start_sweep

from study.contract import EPOCH_METRICS

EPOCHS = 3
TRIALS = 4
GOOD_LR, BAD_LR = 0.3, 1e-4   # after one epoch, BAD_LR is far behind: ASHA must stop it


def tiny_spec(name: str, data: Path, search: str, scheduler: str) -> dict:
    spec = {
        "name": name,
        "dataset": {"name": "mnist1d", "size": 600, "root": str(data)},
        "models": [{"name": "mlp", "widths": [16]}],
        "epochs": EPOCHS,
        # grid order = run order (one trial at a time): the good lr sets ASHA's bar first
        "batch_size": [32],
        "families": {"sgd": {"variants": ["plain"], "lr": [GOOD_LR, BAD_LR]},
                     "adam": {"lr": [0.01, 1e-5]}},
        "search": {"kind": search, "num_samples": TRIALS, "seed": 3},
        "scheduler": {"kind": scheduler, "grace_period": 1, "reduction_factor": 2},
        "resources": {"cpu": 1, "max_concurrent": 1},
        "measure": {"every": 5, "batches": 2, "histograms": False},
    }
    return spec


def check_store(store: SqlStore, name: str, n_trials: int, epochs: int = EPOCHS
                ) -> dict[str, dict]:
    """The invariants every finished sweep's store must satisfy; returns its children."""
    parents = store.parents(name)
    assert len(parents) == 1, parents
    parent, status = parents[0]
    assert status == "FINISHED"
    children = store.children(parent)
    assert len(children) == n_trials, "one child run per trial"
    assert len({c["trial_id"] for c in children.values()}) == n_trials
    assert store.running() == 0, "no run left RUNNING"
    for run_id, child in children.items():
        logged = [int(v) for _, v in store.history(run_id, "epoch")]
        assert logged == list(range(1, len(logged) + 1)), f"each epoch once: {logged}"
        expected = {"finished": "FINISHED", "stopped": "FINISHED", "diverged": "FINISHED"}
        assert expected.get(child["status"]) == child["mlflow_status"], child
        if child["status"] == "finished":
            assert child["epoch"] == epochs
        elif child["status"] == "stopped":
            assert 1 <= child["epoch"] < epochs, "stopped early = fewer epochs"
        lr, bs = float(child["params"]["lr"]), child["params"]["batch_size"]
        assert f"lr={lr:.3g}" in child["name"] and f"bs={bs}" in child["name"], child["name"]
        assert store.inputs(run_id) == ["mnist1d-600"], "the dataset is a logged input"
    return children


CASES = [("grid", "none"), ("grid", "asha"), ("optuna", "none"), ("optuna", "asha")]


@pytest.mark.slow
@pytest.mark.parametrize("search, scheduler", CASES, ids=[f"{a}-{b}" for a, b in CASES])
def test_search_kind_by_scheduler(tmp_path, short_tmp, search, scheduler):
    name = f"m_{search}_{scheduler}"
    spec = tmp_path / "study.yaml"
    spec.write_text(yaml.safe_dump(tiny_spec(name, tmp_path / "data", search, scheduler)))
    proc = run_sweep(tmp_path, spec, ray_tmp=short_tmp)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]

    children = check_store(SqlStore(tmp_path / "mlflow.db"), name, TRIALS)
    statuses = sorted(c["status"] for c in children.values())
    if search == "grid":
        lrs = sorted(float(c["params"]["lr"]) for c in children.values())
        assert lrs == sorted([GOOD_LR, BAD_LR, 0.01, 1e-5])
    else:   # Optuna's conditional space: each family samples within its own lr range
        for child in children.values():
            family, lr = child["params"]["family"], float(child["params"]["lr"])
            low, high = {"sgd": (BAD_LR, GOOD_LR), "adam": (1e-5, 0.01)}[family]
            assert low * (1 - 1e-9) <= lr <= high * (1 + 1e-9), (family, lr)
    if scheduler == "asha" and search == "grid":
        assert "stopped" in statuses, f"ASHA stopped nothing: {statuses}"
    if scheduler == "none":
        assert set(statuses) <= {"finished", "diverged"}, statuses

    report = tmp_path / "reports" / name
    assert (report / "index.html").stat().st_size > 0
    assert (tmp_path / "mlartifacts").is_dir()
    out = proc.stdout
    assert "best setting per family" in out and str(report / "index.html") in out, out[-3000:]
    assert f"{TRIALS} trials in" in out and "compare the runs:" in out, out[-3000:]


def wait_for(predicate, proc, timeout: float = 300, what: str = ""):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the sweep ended before {what}:\n{proc.stdout.read()}"
        value = predicate()
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.slow
def test_optuna_asha_sweep_interrupted_and_resumed(tmp_path, short_tmp):
    name = "m_resume"
    raw = tiny_spec(name, tmp_path / "data", "optuna", "asha")
    raw.update(epochs=4, plugins=["tests.plugins.faulty"],
               families={"faulty": {"lr": [0.01, 0.3], "options": {"sleep_s": 0.08}},
                         "sgd": {"variants": ["plain"], "lr": [0.01, 0.3]}})
    spec = tmp_path / "study.yaml"
    spec.write_text(yaml.safe_dump(raw))
    store = SqlStore(tmp_path / "mlflow.db")

    proc = start_sweep(tmp_path, spec, ray_tmp=short_tmp)
    try:
        def mid_way():
            parents = store.parents(name)
            if not parents:
                return None
            kids = store.children(parents[0][0])
            return any(c["status"] == "running" and c["epoch"] >= 1 for c in kids.values())
        wait_for(mid_way, proc, what="a trial was mid-way")
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=180)
    finally:
        kill_group(proc)
    assert proc.returncode == 130, out[-4000:]
    assert "Tuner.restore" not in out and "run the same command again" in out, out[-4000:]

    # Observed after the driver has stopped: nothing can change the store any more. (The
    # trial seen mid-way may have finished before the signal landed: what each child says is
    # judged by its own epochs, not by what the poll saw.)
    (parent, status), = store.parents(name)
    assert status == "KILLED"
    before = store.children(parent)
    assert len(before) < TRIALS or any(c["status"] == "interrupted" for c in before.values())
    assert store.running() == 0, "an interrupted sweep leaves nothing RUNNING"
    for child in before.values():
        assert child["status"] in {"finished", "stopped", "diverged", "interrupted"}, child
        if child["status"] == "interrupted":   # (all epochs logged but not yet ended: too)
            assert child["mlflow_status"] == "KILLED", child
        if child["epoch"] < 4 and child["status"] not in ("stopped", "diverged"):
            assert child["status"] == "interrupted", child
    settled = {r: (c["status"], store.history(r, "epoch")) for r, c in before.items()
               if c["status"] != "interrupted"}

    again = run_sweep(tmp_path, spec, ray_tmp=short_tmp)
    assert again.returncode == 0, again.stdout[-4000:] + again.stderr[-4000:]
    assert "Resuming" in again.stdout
    children = check_store(store, name, TRIALS, epochs=4)
    assert set(before) <= set(children), "the resumed sweep keeps every run it had"
    for run_id, (status, history) in settled.items():
        assert children[run_id]["status"] == status and store.history(run_id, "epoch") == history
    assert (tmp_path / "reports" / name / "index.html").exists()


def test_every_search_metric_a_spec_may_name_is_reported_each_epoch(tmp_path):
    """search.metric is checked against contract.EPOCH_METRICS: the trial loop must report
    every one of them, every epoch (val_* when there is a validation split)."""
    from study.spec import parse_spec
    from study.trial import run_trial

    raw = tiny_spec("metrics", tmp_path, "grid", "none")
    raw.update(epochs=2, families={"sgd": {"variants": ["plain"], "lr": [0.1]}})
    spec = parse_spec(raw)
    reports = []
    run_trial(spec.trial_config(spec.trials()[0]),
              report=lambda metrics, state: reports.append(metrics))
    assert len(reports) == 2
    for metrics in reports:
        assert set(EPOCH_METRICS) <= set(metrics), set(EPOCH_METRICS) - set(metrics)
        assert all(isinstance(metrics[k], (int, float)) and not math.isnan(metrics[k])
                   for k in EPOCH_METRICS)
