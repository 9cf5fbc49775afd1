"""MLflow as a cluster runs it: ``mlflow server`` on PostgreSQL (the conftest ``pg_mlflow``
fixture), many trial processes logging through it at once, and the server restarted under them.

Every count is read from PostgreSQL with SQL, not through MLflow's client, so a metric that
the client believes logged but the store lost (or stored twice) shows up.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from _tracking_trial import METRICS
from conftest import head_command, head_server_env

from study import contract as C
from study.tracking import POOL_TIMEOUT, open_store, study_parent

ROOT = Path(__file__).resolve().parents[1]
TRIALS = 32

COUNTS = """SELECT count(*), count(DISTINCT (m.run_uuid, m.key, m.step))
            FROM metrics m JOIN runs r ON r.run_uuid = m.run_uuid
            WHERE r.experiment_id = %s"""
TRIAL_RUNS = """SELECT r.status, count(*) FROM runs r JOIN tags t ON t.run_uuid = r.run_uuid
                WHERE r.experiment_id = %s AND t.key = %s AND t.value = %s
                  AND r.lifecycle_stage = 'active' GROUP BY r.status"""


def start_trials(uri: str, study: str, epochs: int, pause_s: float, logs: Path, pg,
                 env: dict[str, str] | None = None):
    """A study's parent run and ``TRIALS`` real trial processes logging into it, released
    together once every one has its run (so all are logging at once, however slowly a loaded
    machine starts them)."""
    experiment = open_store(uri, study)
    parent = study_parent(uri, experiment, study, None, {"trials": TRIALS}, {})
    logs.mkdir()
    go = logs / "GO"
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}",
           "TRIAL_GO_FILE": str(go), **(env or {})}
    procs = [subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "_tracking_trial.py"), uri, experiment, parent,
         f"trial_{i:02d}", str(epochs), str(pause_s)],
        env=env, stdout=open(logs / f"{i}.log", "w"), stderr=subprocess.STDOUT)
        for i in range(TRIALS)]
    deadline = time.monotonic() + 600
    while sum(n for _, n in pg.query(TRIAL_RUNS, experiment, C.TAG_PARENT, parent)) < TRIALS:
        assert time.monotonic() < deadline, "the trials never created their runs"
        assert all(p.poll() is None for p in procs), "a trial ended before it began"
        time.sleep(0.2)
    go.touch()
    return int(experiment), parent, procs


def wait_all(procs, logs: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    try:
        for i, proc in enumerate(procs):
            code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            assert code == 0, (logs / f"{i}.log").read_text()[-3000:]
    finally:
        for proc in procs:          # only the processes this test started
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def starved(logs: Path) -> list[int]:
    """The trials whose log says a write waited out the server's connection pool."""
    return [i for i in range(TRIALS) if POOL_TIMEOUT in (logs / f"{i}.log").read_text()]


def check_store(pg, experiment: int, parent: str, epochs: int) -> None:
    rows, distinct = pg.query(COUNTS, experiment)[0]
    assert (rows, distinct) == (TRIALS * epochs * METRICS,) * 2, \
        f"{rows} metric rows, {distinct} distinct (run, key, step); " \
        f"expected {TRIALS * epochs * METRICS} of each"
    runs = dict(pg.query(TRIAL_RUNS, experiment, C.TAG_PARENT, parent))
    assert runs == {"FINISHED": TRIALS}, runs


@pytest.mark.slow
def test_concurrent_trials_lose_no_metric(pg_mlflow, tmp_path):
    epochs = 10
    started = time.monotonic()
    experiment, parent, procs = start_trials(pg_mlflow.uri, "concurrent", epochs, 0.05,
                                             tmp_path / "logs", pg_mlflow.postgres)
    wait_all(procs, tmp_path / "logs", timeout_s=600)
    check_store(pg_mlflow.postgres, experiment, parent, epochs)
    print(f"{TRIALS} trials x {epochs} epochs x {METRICS} metrics: "
          f"{time.monotonic() - started:.1f} s")
    # the server's pool is sized for its threads (below): no request waits 30 s for a connection
    waited = starved(tmp_path / "logs")
    assert not waited, f"trials {waited} waited out the server's connection pool"


@pytest.mark.slow
@pytest.mark.parametrize("http_retries", ["mlflow", "none"])
def test_server_restarted_mid_study_keeps_every_metric_once(pg_mlflow, tmp_path, http_retries):
    """Killed (SIGKILL: requests in flight get no answer) while the trials log, started again
    on the same port: the trials wait for it, and the store holds every metric exactly once.
    With MLflow's HTTP retries on (its default) and off, so study.tracking's own waiting
    (``Patient``) is what gets the trials through in the second case."""
    epochs = 40
    pg = pg_mlflow.postgres
    env = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"} if http_retries == "none" else {}
    experiment, parent, procs = start_trials(pg_mlflow.uri, f"restarted-{http_retries}", epochs,
                                             0.25, tmp_path / "logs", pg, env)
    total = TRIALS * epochs * METRICS
    deadline = time.monotonic() + 300
    while pg.query(COUNTS, experiment)[0][0] < total // 5:
        assert time.monotonic() < deadline, "the trials never got going"
        assert all(p.poll() is None for p in procs), "a trial ended before the restart"
        time.sleep(0.2)
    pg_mlflow.stop(signal.SIGKILL)
    at_kill = pg.query(COUNTS, experiment)[0][0]
    time.sleep(3)
    down = time.monotonic()
    pg_mlflow.start(timeout_s=180)
    print(f"killed at {at_kill}/{total} metrics; back after {time.monotonic() - down + 3:.1f} s")
    assert at_kill < total, "every metric was in before the kill: nothing was restarted"
    wait_all(procs, tmp_path / "logs", timeout_s=600)
    check_store(pg, experiment, parent, epochs)
    texts = [(tmp_path / "logs" / f"{i}.log").read_text() for i in range(TRIALS)]
    waited = sum("retrying" in t for t in texts)
    pool = len(starved(tmp_path / "logs"))  # the server's pool ran dry (BAD_REQUEST)
    print(f"{waited} of {TRIALS} trials waited for the server in study.tracking "
          f"({pool} of them on a pool timeout)")
    if http_retries == "none":
        assert waited, "no trial needed study.tracking's retries: the restart tested nothing"
    assert pool == 0, "the restarted server's connection pool ran dry"


def test_the_heads_mlflow_pool_outlasts_its_threads():
    """MLflow's server runs each request in one of anyio's worker threads (40 per uvicorn
    worker), and ``log_batch`` holds two pooled connections at once (the run read in one
    session, the metrics written in another, ``SqlAlchemyStore.log_batch``). A pool under
    twice the threads deadlocks under load: every thread holds one connection and waits for a
    second until the pool's 30-s timeout (MLflow's default pool, 5 + 10: 30 of 32 trials of
    the concurrent test above hit it on a slow machine). cluster.yaml sizes the pool for the
    threads, and PostgreSQL's connections for all of the server's workers."""
    import re

    import anyio
    import anyio.to_thread

    async def limit() -> int:
        return int(anyio.to_thread.current_default_thread_limiter().total_tokens)

    threads, env = anyio.run(limit), head_server_env()
    pool = int(env["MLFLOW_SQLALCHEMYSTORE_POOL_SIZE"]) + int(
        env["MLFLOW_SQLALCHEMYSTORE_MAX_OVERFLOW"])
    assert pool >= 2 * threads, (pool, threads)
    workers = int(re.search(r"--workers (\d+)", head_command("mlflow server")).group(1))
    connections = int(re.search(r"max_connections=(\d+)", head_command("initdb")).group(1))
    assert connections >= workers * pool + 10, (connections, workers, pool)


@pytest.mark.slow
def test_cluster_head_commands_start_postgres_and_mlflow(postgres):
    """cluster.yaml's head commands run as a head runs them (each twice: every `ray up` does):
    PostgreSQL with the ``mlflow`` database on a Unix socket and no TCP port, then the MLflow
    server on it, which the second run replaces (its whole process group) on the same port.
    Changed for a test machine: the server's address (127.0.0.1 and a free port)."""
    import pwd
    import shutil
    import urllib.request

    from conftest import free_port
    from postgres import run_as

    user, me = run_as(), pwd.getpwuid(os.geteuid()).pw_name
    home = Path(tempfile.mkdtemp(prefix="gs-head-", dir="/tmp"))
    (home / "gradstudy").mkdir()
    if user:
        shutil.chown(home, user)
    as_user = ["runuser", "-u", user, "--"] if user else []
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    env = ["env", f"HOME={home}", f"PATH={path}"]
    pgdata, port = home / "gradstudy-pg", free_port()
    uri = f"http://127.0.0.1:{port}"
    server = head_command("mlflow server").replace("--port 5000", f"--port {port}")
    server = server.replace('HEAD_IP=$(hostname -I | cut -d" " -f1)', "HEAD_IP=127.0.0.1")

    def run(command: str, *prefix: str) -> str:
        done = subprocess.run([*prefix, *env, "bash", "-c", command], capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    def healthy(timeout_s: float = 240) -> int:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(uri + "/health", timeout=2)
                return int((home / "gradstudy-mlflow.pid").read_text())
            except (OSError, ValueError):
                time.sleep(1)
        pytest.fail(f"no MLflow server on {uri}: {(home / 'gradstudy-mlflow.log').read_text()}")

    group = None
    try:
        for _ in range(2):
            run(head_command("initdb"), *as_user)
        psql = ["psql", "-h", str(pgdata), "-d", "mlflow", "-tAc"]
        listed = run(" ".join([*psql, '"SELECT current_setting(\'listen_addresses\')"']),
                     *as_user)
        assert listed.strip() == "", f"PostgreSQL listens on TCP: {listed!r}"
        if user:   # peer authentication: our OS user needs a role of the same name
            run(" ".join([*psql, f'"CREATE ROLE {me} LOGIN SUPERUSER"']), *as_user)
        run(server)
        group = healthy()
        run(server)                      # `ray up` again: the old server goes, a new one comes
        new_group = healthy()
        assert new_group != group
        with pytest.raises(ProcessLookupError):
            os.killpg(group, 0)          # nothing of the old server is left
        group = new_group
    finally:
        if group:
            os.killpg(group, signal.SIGTERM)   # the server this test started
        subprocess.run([*as_user, str(postgres.bin / "pg_ctl"), "-D", str(pgdata), "-m", "fast",
                        "-w", "stop"], capture_output=True, timeout=60)
        shutil.rmtree(home, ignore_errors=True)


def test_mlflow_opens_the_socket_uri_the_head_uses(pg_mlflow):
    """``postgresql://<user>@/mlflow?host=<socket folder>`` (cluster.yaml's store URI) is one
    MLflow's SQLAlchemy store opens: the tables the server created are there."""
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    pg = pg_mlflow.postgres
    # the test cluster's socket is named after its port; the head's is PostgreSQL's default
    store = SqlAlchemyStore(f"postgresql://postgres@/mlflow?host={pg.folder}&port={pg.port}",
                            str(pg.folder / "artifacts"))
    assert "Default" in [e.name for e in store.search_experiments()]
    store.engine.dispose()
