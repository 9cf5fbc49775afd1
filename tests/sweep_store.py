"""Helpers for the end-to-end sweep tests: run ``python -m study sweep`` as a user would and
read the sqlite MLflow store back with plain SQL (not through the code under test).

Not collected itself (no ``test_`` prefix)."""
from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def sweep_env(ray_tmp: Path | None = None) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_DEDUP_LOGS": "0"}
    if ray_tmp is not None:
        env["RAY_TMPDIR"] = str(ray_tmp)
    return env


def run_sweep(cwd: Path, spec: Path, *extra: str, ray_tmp: Path | None = None,
              timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "study", "sweep", str(spec), *extra], cwd=cwd,
                          env=sweep_env(ray_tmp), capture_output=True, text=True,
                          timeout=timeout, check=False)


def start_sweep(cwd: Path, spec: Path, *extra: str, ray_tmp: Path | None = None):
    """A sweep in its own process group (so the test can signal it and clean up after it)."""
    return subprocess.Popen([sys.executable, "-m", "study", "sweep", str(spec), *extra],
                            cwd=cwd, env=sweep_env(ray_tmp), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL what is left of the process group the test started (Ray's processes)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)


class SqlStore:
    """The MLflow sqlite store, read with SQL: runs, their tags, params and metrics."""

    def __init__(self, db: Path):
        self.db = db

    def rows(self, query: str, *args) -> list[tuple]:
        if not self.db.exists():
            return []
        with sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=30) as con:
            try:
                return con.execute(query, args).fetchall()
            except sqlite3.OperationalError as err:   # schema not created yet
                if "no such table" in str(err):
                    return []
                raise

    def parents(self, study: str) -> list[tuple[str, str]]:
        """(run id, MLflow status) of the study's parent runs."""
        return self.rows(
            "SELECT r.run_uuid, r.status FROM runs r JOIN experiments e "
            "ON r.experiment_id = e.experiment_id JOIN tags t ON t.run_uuid = r.run_uuid "
            "WHERE e.name = ? AND t.key = 'gradstudy.kind' AND t.value = 'study'", study)

    def children(self, parent: str) -> dict[str, dict]:
        """run id -> {status (MLflow), tag status, trial_id, name, params, epoch (last)}."""
        out = {}
        for run_id, status, name in self.rows(
                "SELECT r.run_uuid, r.status, r.name FROM runs r JOIN tags t "
                "ON t.run_uuid = r.run_uuid WHERE t.key = 'mlflow.parentRunId' AND t.value = ?",
                parent):
            tags = dict(self.rows("SELECT key, value FROM tags WHERE run_uuid = ?", run_id))
            params = dict(self.rows("SELECT key, value FROM params WHERE run_uuid = ?", run_id))
            epoch = self.rows("SELECT value FROM latest_metrics WHERE run_uuid = ? "
                              "AND key = 'epoch'", run_id)
            out[run_id] = {"mlflow_status": status, "status": tags.get("status"),
                           "trial_id": tags.get("trial_id"), "name": name, "params": params,
                           "tags": tags, "epoch": int(epoch[0][0]) if epoch else 0}
        return out

    def history(self, run_id: str, key: str) -> list[tuple[int, float]]:
        return self.rows("SELECT step, value FROM metrics WHERE run_uuid = ? AND key = ? "
                         "ORDER BY step, timestamp", run_id, key)

    def running(self) -> int:
        return self.rows("SELECT COUNT(*) FROM runs WHERE status = 'RUNNING'")[0][0]

    def metrics_of(self, run_id: str) -> dict[str, float]:
        return dict(self.rows("SELECT key, value FROM latest_metrics WHERE run_uuid = ?", run_id))

    def inputs(self, run_id: str) -> list[str]:
        """Names of the datasets logged as the run's inputs."""
        return [n for (n,) in self.rows(
            "SELECT d.name FROM inputs i JOIN datasets d ON d.dataset_uuid = i.source_id "
            "WHERE i.destination_id = ?", run_id)]
