"""Shared fixtures for the end-to-end tests: a real MLflow tracking server on a free
127.0.0.1 port (the HTTP path that clusters use), started and stopped by the test itself."""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    """The tests' tensors are tiny: on a 2-core machine extra intra-op threads only contend
    (measured 30-60x slower under load). Subprocesses (sweeps) set their own threads."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def head_command(word: str) -> str:
    """The one command of cluster.yaml's ``head_start_ray_commands`` that contains ``word``."""
    import yaml

    cfg = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    return next(c for c in cfg["head_start_ray_commands"] if word in c)


def head_server_env() -> dict[str, str]:
    """The MLflow settings a cluster's head starts its tracking server with (the store's
    connection pool), read from cluster.yaml, so tests run the server as the head does."""
    return dict(re.findall(r"(MLFLOW_SQLALCHEMYSTORE_\w+)=(\S+)", head_command("mlflow server")))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """An MLflow tracking server (one worker, no job runner) on 127.0.0.1 with its own
    artifact folder: ``mlflow ui`` on a sqlite store by default (~8 s and ~0.5 GiB), or
    ``mlflow server`` on ``backend`` (a PostgreSQL URI: what a cluster's head runs, with the
    head's pool settings)."""

    def __init__(self, folder: Path, port: int | None = None, backend: str | None = None):
        self.folder = folder
        self.port = port or free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.db = folder / "mlflow.db"
        self.backend = backend
        self.proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 90.0) -> MlflowServer:
        self.folder.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
               **(head_server_env() if self.backend else {})}
        mlflow = Path(sys.executable).with_name("mlflow")
        self.log = open(self.folder / "server.log", "a")
        self.proc = subprocess.Popen(
            [str(mlflow), "server" if self.backend else "ui",
             "--backend-store-uri", self.backend or f"sqlite:///{self.db}",
             "--artifacts-destination", str(self.folder / "mlartifacts"),
             "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"],
            cwd=self.folder, env=env, stdout=self.log, stderr=subprocess.STDOUT,
            start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow exited: {(self.folder / 'server.log').read_text()}")
            try:
                urllib.request.urlopen(self.uri + "/health", timeout=2)
                return self
            except OSError:
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"mlflow did not answer on {self.uri} in {timeout_s:.0f}s")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Stop the server's own process group (the one this object started), nothing else;
        ``sig=SIGKILL`` is a crash (requests in flight get no answer)."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        if self.proc is not None:
            self.log.close()
        self.proc = None


@pytest.fixture
def mlflow_server(tmp_path):
    """A running MLflow tracking server; ``.uri`` is its http://127.0.0.1:<port> address."""
    server = MlflowServer(tmp_path / "mlflow-server").start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def postgres():
    """A throwaway PostgreSQL cluster (tests/postgres.py) for the whole session; skips where
    the server binaries or the driver are missing (.ci/run installs both)."""
    pytest.importorskip("psycopg", reason="psycopg missing: pip install -e '.[test]'")
    from postgres import Postgres, binaries

    if binaries() is None:
        pytest.skip("no PostgreSQL server binaries (apt-get install -y postgresql)")
    cluster = Postgres(free_port()).start()
    yield cluster
    cluster.stop()


@pytest.fixture(scope="session")
def pg_mlflow(postgres, tmp_path_factory):
    """``mlflow server`` on the PostgreSQL cluster: a cluster head's tracking server.
    ``.postgres`` reads the database directly; ``.stop()`` / ``.start()`` restart it."""
    server = MlflowServer(tmp_path_factory.mktemp("pg-mlflow"), backend=postgres.uri)
    server.postgres = postgres
    server.start(timeout_s=180)
    yield server
    server.stop()


@pytest.fixture
def unused_port() -> int:
    """A 127.0.0.1 port nothing listens on (a tracking server that is down)."""
    return free_port()


@pytest.fixture
def short_tmp():
    """A short folder under /tmp for Ray's session files (Unix socket paths must stay under
    108 characters, which pytest's tmp_path can exceed)."""
    with tempfile.TemporaryDirectory(prefix="gs-", dir="/tmp") as d:
        yield Path(d)
