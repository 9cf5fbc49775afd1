"""Stopping a sweep and running the same command again resumes it.

`python -m study sweep` runs as a real subprocess on its own local Ray runtime (its session files
in a private temp folder). It is interrupted once some trials have finished and others are
mid-way (Ctrl-C, or SIGKILL of the driver), then the same command is run again. Finished trials
must not run again, unfinished ones must continue from their last epoch checkpoint, and every
trial must appear once in MLflow under the sweep's one parent run.
"""
from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from sweep_store import kill_group

ROOT = Path(__file__).resolve().parents[1]
EPOCHS = 4
SLOW_STEP_S = 0.25   # 22 steps/epoch: a slow trial takes ~22 s, a fast one ~1 s

SPEC = {
    "name": "resume",
    "models": [{"name": "mlp", "widths": [32]}],
    "epochs": EPOCHS,
    "lr": [0.05, 0.1],
    "batch_size": [32],
    # two fast trials (run first, finish) and two slow ones (interrupted mid-way)
    "families": {"faulty": {"options": {"sleep_s": [0.0, SLOW_STEP_S]}}},
    "plugins": ["tests.plugins.faulty"],
    "resources": {"cpu": 1},
    "measure": {"every": 0, "histograms": False},
    "tracking": {"uri": "sqlite:///mlflow.db"},
    "storage": "results",
    "max_failures": 0,
}


def start_sweep(cwd: Path, ray_tmp: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_TMPDIR": str(ray_tmp),
           "RAY_DEDUP_LOGS": "0"}
    return subprocess.Popen([sys.executable, "-m", "study", "sweep", "resume.yaml", "--no-report"],
                            cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def finish(proc: subprocess.Popen, timeout: float = 300) -> str:
    out, _ = proc.communicate(timeout=timeout)
    return out or ""


class Store:
    """Read-side view of the sweep's MLflow store and Tune results folder."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.study_dir = folder / "results" / "resume"
        self._client = None

    @property
    def client(self):
        if self._client is None:
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(f"sqlite:///{self.folder / 'mlflow.db'}")
        return self._client

    def ready(self) -> bool:
        return (self.study_dir / "gradstudy.json").exists()

    def parent_id(self) -> str:
        return json.loads((self.study_dir / "gradstudy.json").read_text())["parent_run_id"]

    def experiment_id(self) -> str:
        return self.client.get_experiment_by_name("resume").experiment_id

    def parents(self):
        return self.client.search_runs([self.experiment_id()], "tags.`gradstudy.kind` = 'study'")

    def children(self):
        return self.client.search_runs([self.experiment_id()],
                                       f"tags.mlflow.parentRunId = '{self.parent_id()}'")

    def progress(self) -> dict[str, tuple[str, int]]:
        """trial id -> (status tag, last epoch logged)."""
        out = {}
        for run in self.children():
            out[run.data.tags["trial_id"]] = (run.data.tags["status"],
                                              int(run.data.metrics.get("epoch", 0)))
        return out

    def epoch_history(self, trial_id: str) -> list[tuple[int, float, int]]:
        run = next(r for r in self.children() if r.data.tags["trial_id"] == trial_id)
        return sorted((m.step, m.value, m.timestamp)
                      for m in self.client.get_metric_history(run.info.run_id, "epoch"))

    def result_file(self, trial_id: str) -> Path:
        (path,) = self.study_dir.glob(f"*_{trial_id}/result.json")
        return path

    def reported_epochs(self, trial_id: str) -> list[int]:
        lines = self.result_file(trial_id).read_text().splitlines()
        return [int(json.loads(line)["epoch"]) for line in lines if line.strip()]

    def last_snapshot(self) -> float:
        states = list(self.study_dir.glob("experiment_state*.json"))
        return max((p.stat().st_mtime for p in states), default=0.0)


def wait_until_mid_way(store: Store, proc: subprocess.Popen, timeout: float = 300):
    """Poll until >= 1 trial has finished and >= 1 is running with 1 <= epoch < EPOCHS."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, ("the sweep ended before it could be interrupted:\n"
                                     + finish(proc))
        if store.ready():
            progress = store.progress()
            finished = [t for t, (s, _) in progress.items() if s == "finished"]
            mid_way = [t for t, (s, e) in progress.items() if s == "running" and 1 <= e < EPOCHS]
            if finished and mid_way:
                return progress
        time.sleep(0.5)
    proc.kill()
    raise AssertionError("no moment with finished and mid-way trials:\n" + finish(proc))


def saved_trial_statuses(study_dir: Path) -> dict[str, str]:
    """Tune's own record of the stopped sweep (what a resume starts from): trial id -> status,
    read with Ray's ExperimentAnalysis from the experiment state on disk."""
    from ray.tune import ExperimentAnalysis

    return {t.trial_id: t.status for t in ExperimentAnalysis(str(study_dir)).trials}


@pytest.mark.slow
@pytest.mark.parametrize("stop", ["sigint", "sigkill"])
def test_interrupted_sweep_resumes(tmp_path, short_tmp, stop):
    spec = {**SPEC, "dataset": {"name": "mnist1d", "size": 1000, "root": str(tmp_path / "data")}}
    (tmp_path / "resume.yaml").write_text(yaml.safe_dump(spec))
    store = Store(tmp_path)

    proc = start_sweep(tmp_path, short_tmp)
    try:
        seen = wait_until_mid_way(store, proc)
        if stop == "sigkill":
            # Tune snapshots the experiment every ~10 s; kill once a snapshot may have seen the
            # finished trials and the mid-way trials' first checkpoints (which trials it did
            # see is read back from the snapshot itself below, after everything stopped).
            t_seen = time.time()
            while store.last_snapshot() <= t_seen and proc.poll() is None:
                time.sleep(0.2)
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
        else:
            proc.send_signal(signal.SIGINT)
            finish(proc, timeout=120)
            assert proc.returncode == 130, "an interrupted sweep says so, with 128 + SIGINT"
    finally:
        kill_group(proc)

    # Everything is stopped now (driver and trial workers): observations from here on cannot
    # race with the sweep. What Tune saved decides what the resume must do.
    saved = saved_trial_statuses(store.study_dir)
    before = store.progress()
    finished = sorted(t for t, s in saved.items() if s == "TERMINATED")
    unfinished = sorted(t for t in saved if t not in finished)
    assert finished and unfinished, f"need both kinds at the interruption: {saved} (seen {seen})"
    assert set(before) <= set(saved), "every MLflow trial run is a trial of the sweep"
    if stop == "sigint":
        assert store.parents()[0].info.status == "KILLED"
        assert all(before[t][0] == "finished" for t in finished), before
        # trials the interrupted sweep had started and not finished say so
        assert all(before[t][0] == "interrupted" for t in unfinished if t in before), before
    parent = store.parent_id()
    kept = {t: (store.epoch_history(t), store.result_file(t).read_bytes()) for t in finished}
    checkpointed = {t: before[t][1] if t in before else 0 for t in unfinished}

    again = start_sweep(tmp_path, short_tmp)
    try:
        out = finish(again)
    finally:
        kill_group(again)
    assert again.returncode == 0, out[-4000:]
    assert "Resuming" in out

    # One sweep, one parent run, each trial of the spec once under it, all finished.
    assert store.parent_id() == parent
    assert [p.info.run_id for p in store.parents()] == [parent]
    progress = store.progress()
    assert sorted(progress) == sorted(saved), "no trial added or lost"
    assert len(store.children()) == len(saved) == 4
    assert all(s == "finished" and e == EPOCHS for s, e in progress.values()), progress

    for t in finished:   # not run again: nothing logged, nothing reported
        history, results = kept[t]
        assert store.epoch_history(t) == history
        assert store.result_file(t).read_bytes() == results
    for t in unfinished:
        history = store.epoch_history(t)
        assert [step for step, _, _ in history] == sorted({step for step, _, _ in history})
        assert [int(v) for _, v, _ in history] == list(range(1, EPOCHS + 1))
        reported = store.reported_epochs(t)
        assert reported[-1] == EPOCHS and reported[0] == 1
        restarts = [b for a, b in itertools.pairwise(reported) if b <= a]
        if stop == "sigint":
            # Tune saves its state on Ctrl-C; under load that snapshot can precede the result in
            # flight (seen: [1, 2, 2, 3, 4]: epoch 2 reported, the state still at epoch 1's
            # checkpoint). So at most that one epoch is repeated, from the checkpoint before it.
            pairs = list(itertools.pairwise(reported))
            assert len(restarts) <= 1 and all(b == a for a, b in pairs if b <= a), reported
            assert sorted(set(reported)) == list(range(1, EPOCHS + 1)), reported
        # continued from a checkpoint, never from epoch 0 again
        assert all(b > 1 for b in restarts), reported
        assert 1 not in reported[1:], reported
        if checkpointed[t] >= 1:
            assert reported.count(1) == 1
