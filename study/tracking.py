"""MLflow bookkeeping: one parent run per sweep, one child run per trial.

Uses ``MlflowClient`` only (no global active run), so the driver and every trial process
talk to the store independently. A trial finds its child run again by the run id kept in its
own files (``study.storage.TrialFiles``), so a resumed trial keeps logging into the run it
started, exactly once per step. A trial run's
final status (``study.contract``) is written by the trial when it ends by itself and by the
driver when Tune ends it (stopped by the scheduler, errored, interrupted).

A trial's writes outlive a tracking server restart (``Patient``): each call is retried with the
same arguments, so a metric's replay carries its first timestamp and the store's primary key
(run, key, timestamp, step, value) makes it a no-op instead of a second row.
"""
from __future__ import annotations

import functools
import json
import logging
import random
import tempfile
import time
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException, RestException
from mlflow.tracking import MlflowClient

from study import contract as C

log = logging.getLogger(__name__)
RETRY_S = 900.0   # how long a trial waits for its tracking server before it fails
TRANSIENT = {"TEMPORARILY_UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED",
             "REQUEST_LIMIT_EXCEEDED"}
DUPLICATE_KEY = ("UNIQUE constraint failed", "UniqueViolation")   # sqlite, PostgreSQL
POOL_TIMEOUT = "/3o7r"   # in the link SQLAlchemy puts in its message (sqlalche.me/e/<v>/3o7r)


@functools.lru_cache(maxsize=8)
def client_for(uri: str) -> MlflowClient:
    """One client per store and process: opening a sqlite store costs seconds, and Ray
    reuses trial processes across trials."""
    return MlflowClient(uri)


SQLITE = "sqlite:///"


def resolve_uri(uri: str, base: Path | None = None) -> str:
    """Make a relative ``sqlite:///file.db`` absolute, so trial processes (whose working
    directory Ray may change) write to the same store as the driver."""
    if uri.startswith(SQLITE) and not uri.startswith(SQLITE + "/"):
        return SQLITE + str((base or Path.cwd()) / uri[len(SQLITE):])
    return uri


def artifact_location(uri: str) -> str | None:
    """Artifacts of a sqlite store go to ``mlartifacts/`` beside the database (MLflow's own
    default is ``./mlruns`` under whatever folder the driver runs in); a tracking server
    decides for itself (None)."""
    if not uri.startswith(SQLITE):
        return None
    return (Path(uri[len(SQLITE):]).parent / "mlartifacts").as_uri()


def check_reachable(uri: str, timeout_s: float = 10.0) -> None:
    """Fail fast, before any trial starts, when the tracking server cannot be reached."""
    if not uri.startswith(("http://", "https://")):
        return
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s)
    except (urllib.error.URLError, OSError) as err:
        raise ConnectionError(
            f"tracking.uri: the MLflow server at {uri} is unreachable ({err})") from None


def open_store(uri: str, study: str) -> str:
    """Open the tracking store and return the study's experiment id (created if new), so a
    store that cannot be opened fails before anything starts, naming the file or server."""
    where = uri[len(SQLITE):] if uri.startswith(SQLITE) else uri
    check_sqlite_file(uri)
    try:
        client = client_for(uri)
        exp = client.get_experiment_by_name(study)
        exp_id = exp.experiment_id if exp else client.create_experiment(
            study, artifact_location=artifact_location(uri))
    except Exception as err:  # noqa: BLE001 - any store failure is reported the same way
        client_for.cache_clear()
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConnectionError(f"tracking.uri: cannot open the MLflow store {where} "
                              f"({first[:300]})") from None
    if uri.startswith(SQLITE):
        write_ahead(Path(where))
    return exp_id


def write_ahead(path: Path) -> None:
    """Put a sqlite store in write-ahead-log mode (kept in the file). A trial's run then costs
    ~25% less to write (create, end-of-run metrics, end: ~100 -> ~75 ms on this machine's disk,
    fewer syncs) and readers (the driver, ``mlflow ui``) no longer block the trials' writes.
    Best effort: a store another process holds busy stays as it is. Like any sqlite store, it
    wants a local disk (WAL needs shared memory: not on a network file system)."""
    import sqlite3

    try:
        db = sqlite3.connect(path, timeout=5)
        try:
            db.execute("PRAGMA journal_mode=WAL")
        finally:
            db.close()
    except sqlite3.Error as err:
        log.warning("the MLflow store %s stays in its journal mode (%s)", path, err)


def check_sqlite_file(uri: str) -> None:
    """A sqlite store: its folder must exist and the file, if there, must be a database."""
    import sqlite3

    if not uri.startswith(SQLITE):
        return
    path = Path(uri[len(SQLITE):])
    if not path.parent.is_dir():
        raise ConnectionError(f"tracking.uri: the folder of the MLflow store {path} does not "
                              "exist")
    if not path.exists():
        return
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
            problem = db.execute("PRAGMA quick_check").fetchone()[0]
    except sqlite3.Error as err:
        problem = str(err)
    if problem != "ok":
        raise ConnectionError(f"tracking.uri: cannot open the MLflow store {path}: "
                              f"{problem.splitlines()[0]} (move the file aside or fix the URI)")


def transient(err: Exception) -> bool:
    """A failure worth waiting out: the server unreachable or overloaded (MLflow's client has
    already retried the request itself), not a bad request. The server reports its database
    connection pool running dry (every trial retrying at once after a restart) as BAD_REQUEST
    (mlflow/store/db/utils.py maps any SQLAlchemyError but OperationalError so): that one is
    recognised by SQLAlchemy's error code for a pool timeout, 3o7r."""
    if isinstance(err, MlflowException):
        return err.error_code in TRANSIENT or (
            err.error_code == "INTERNAL_ERROR" and not isinstance(err, RestException)) or (
            err.error_code == "BAD_REQUEST" and POOL_TIMEOUT in str(err))
    return isinstance(err, OSError)   # requests' ConnectionError is one


class Patient:
    """An ``MlflowClient`` whose calls wait out a tracking server that is down or restarting
    (up to ``RETRY_S``), replaying the same arguments; MLflow's own HTTP retries give up after
    about 4 minutes and leave a trial crashed over a server that came back."""

    def __init__(self, client: MlflowClient, retry_s: float = RETRY_S):
        self.client, self.retry_s = client, retry_s

    def __getattr__(self, name: str):
        call = getattr(self.client, name)

        def patiently(*args, **kwargs):
            deadline, pause = time.monotonic() + self.retry_s, 1.0
            while True:
                try:
                    return call(*args, **kwargs)
                except Exception as err:  # noqa: BLE001 - transient() decides
                    if not transient(err) or time.monotonic() + 1.5 * pause > deadline:
                        raise
                    log.warning("tracking server unavailable (%s); retrying %s in %.0f s",
                                str(err).splitlines()[0][:200], name, pause)
                    time.sleep(pause * random.uniform(0.5, 1.5))  # trials out of step
                    pause = min(2 * pause, 30.0)
        return patiently


def study_parent(uri: str, exp_id: str, study: str, parent_run_id: str | None,
                 params: dict[str, Any], artifacts: dict[str, Any]) -> str:
    """The sweep's parent run: ``parent_run_id`` when given (a resumed sweep), else a new one
    with the study's params and artifacts."""
    client = client_for(uri)
    if parent_run_id:
        client.set_terminated(parent_run_id, "RUNNING")
        return parent_run_id
    run = client.create_run(exp_id, run_name=f"{study}-sweep-{time.strftime('%Y%m%d-%H%M%S')}",
                            tags={C.TAG_KIND: C.KIND_STUDY, C.TAG_STUDY: study})
    client.log_batch(run.info.run_id, params=[Param(k, str(v)) for k, v in params.items()])
    with tempfile.TemporaryDirectory() as tmp:
        for name, content in artifacts.items():
            path = Path(tmp) / name
            path.write_text(content if isinstance(content, str) else json.dumps(content, indent=1))
            client.log_artifact(run.info.run_id, str(path))
    return run.info.run_id


def finish_parent(uri: str, parent_run_id: str, status: str = "FINISHED") -> None:
    client_for(uri).set_terminated(parent_run_id, status)


def children(uri: str, experiment_id: str, parent_run_id: str, status: str | None = None):
    """The sweep's trial runs (optionally only those whose status tag is ``status``)."""
    client = client_for(uri)
    query = f"tags.`{C.TAG_PARENT}` = '{parent_run_id}'"
    if status:
        query += f" and tags.`{C.TAG_STATUS}` = '{status}'"
    runs, token = [], None
    while True:
        page = client.search_runs([experiment_id], query, max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def find_trial_run(uri: str, experiment_id: str, parent_run_id: str, trial_id: str):
    """A trial's run by search: only for trials of sweeps stored before trials kept their
    run id in their own files."""
    found = client_for(uri).search_runs(
        [experiment_id], filter_string=f"tags.`{C.TAG_PARENT}` = '{parent_run_id}' "
                                       f"and tags.`{C.TAG_TRIAL_ID}` = '{trial_id}'",
        max_results=1)
    return found[0] if found else None


def settle(uri: str, run_id: str, status: str, current: str | None = None) -> None:
    """Give a trial run its final status tag and the MLflow run status that goes with it
    (written only when it changes, so a run's end time stays the trial's own)."""
    client = client_for(uri)
    if current is None:
        current = client.get_run(run_id).data.tags.get(C.TAG_STATUS)
    if current != status:
        client.log_batch(run_id, tags=[RunTag(C.TAG_STATUS, status)])
        client.set_terminated(run_id, C.MLFLOW_STATUS[status])


def mark_interrupted(uri: str, experiment_id: str, parent_run_id: str) -> int:
    """Trials left running by a stopped sweep -> interrupted (they continue on resume)."""
    runs = children(uri, experiment_id, parent_run_id, status=C.RUNNING)
    for run in runs:
        settle(uri, run.info.run_id, C.INTERRUPTED, current=C.RUNNING)
    return len(runs)


class TrialRun:
    """The child run of one trial: ``run_id`` when it has one (read by key, O(1); ``tags``
    written again: the node id is this attempt's), else a new run. Metrics are kept until
    ``flush`` (at checkpoints and at the end): one write per checkpoint instead of one per
    epoch and per measurement. Every write waits out a tracking server restart."""

    def __init__(self, uri: str, experiment_id: str, parent_run_id: str, trial_id: str,
                 params: dict[str, Any], tags: dict[str, str], dataset: dict[str, str],
                 run_id: str | None = None, retry_s: float = RETRY_S):
        self.uri = uri
        # a tracking server can restart under a trial; a sqlite file cannot, so no waiting there
        remote = uri.startswith(("http://", "https://"))
        self.client = Patient(client_for(uri), retry_s if remote else 0.0)
        self.pending: list[Metric] = []
        if run_id is not None:
            self.run_id = run_id
            run = self.client.get_run(run_id)
            self.logged = {k: max(m.step for m in self.client.get_metric_history(run_id, k))
                           for k in run.data.metrics}
            self.client.log_batch(run_id, tags=[RunTag(C.TAG_STATUS, C.RUNNING),
                                                *[RunTag(k, v) for k, v in tags.items()]])
            self.client.set_terminated(run_id, "RUNNING")
        else:
            run = self.client.create_run(
                experiment_id, run_name=run_name(params),
                tags={C.TAG_PARENT: parent_run_id, C.TAG_KIND: C.KIND_TRIAL,
                      C.TAG_TRIAL_ID: trial_id, C.TAG_STATUS: C.RUNNING, **tags})
            self.run_id = run.info.run_id
            if remote:
                # a create replayed after the server committed it but died before answering
                # leaves a twin: every process of this trial keeps the oldest run, drops the rest
                query = (f"tags.`{C.TAG_PARENT}` = '{parent_run_id}' "
                         f"and tags.`{C.TAG_TRIAL_ID}` = '{trial_id}'")
                twins = sorted(self.client.search_runs([experiment_id], query),
                               key=lambda r: (r.info.start_time, r.info.run_id)) or [run]
                self.run_id = twins[0].info.run_id
                for twin in twins[1:]:
                    self.client.delete_run(twin.info.run_id)
            self.logged: dict[str, int] = {}
            self.client.log_batch(self.run_id, params=[Param(k, str(v)[:6000])
                                                       for k, v in params.items()])
            log_dataset(self.client, self.run_id, **dataset)

    def log(self, metrics: dict[str, float], step: int) -> None:
        """Log once per step: on resume, steps the store already holds are skipped (training
        is deterministic, so they would carry the same values); a retried batch is the same
        Metric objects, timestamps included, so a replay stores nothing twice."""
        ts = int(time.time() * 1000)
        self.pending += [Metric(k, float(v), ts, step) for k, v in metrics.items()
                         if step > self.logged.get(k, -1)]

    def flush(self, tags: list[RunTag] | None = None) -> None:
        """Write the pending metrics (and ``tags``, with the last chunk)."""
        batch, self.pending = self.pending, []
        chunks = [batch[i:i + 900] for i in range(0, len(batch), 900)] or [[]]
        for i, chunk in enumerate(chunks):
            last = i == len(chunks) - 1
            if chunk or (last and tags):
                self.client.log_batch(self.run_id, metrics=chunk, tags=(tags or []) if last else [])

    def log_json(self, name: str, obj: Any) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / name
            path.write_text(json.dumps(obj))
            self.client.log_artifact(self.run_id, str(path))

    def end(self, status: str) -> None:
        """The last metrics and the status tag in one write, then the run's end."""
        self.flush(tags=[RunTag(C.TAG_STATUS, status)])
        self.client.set_terminated(self.run_id, C.MLFLOW_STATUS[status])


def run_name(config: dict[str, Any]) -> str:
    """What MLflow's run list shows (and cuts after ~30 characters): the family, lr and batch
    size first, then the model, variant and any varying options."""
    model, family, rest = (str(config["arm"]).split("/", 2) + ["", ""])[:3]
    return f"{family} lr={config['lr']:.3g} bs={config['batch_size']} · {model}/{rest}"


def log_dataset(client: MlflowClient | Patient, run_id: str, name: str, digest: str, source: str,
                context: str = "training") -> None:
    """The trial's data as an MLflow dataset input (the runs table's Dataset column)."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    dataset = Dataset(name=name, digest=digest, source_type="local", source=source)
    inputs = [DatasetInput(dataset, [InputTag("mlflow.data.context", context)])]
    try:
        client.log_inputs(run_id, inputs)
    except MlflowException as err:
        # MLflow looks the dataset up, then inserts it: two trials starting together in an
        # experiment both insert, and the second fails on the key (its transaction rolled
        # back). Once more, the lookup finds the first one's record.
        if not any(mark in str(err) for mark in DUPLICATE_KEY):
            raise
        client.log_inputs(run_id, inputs)
