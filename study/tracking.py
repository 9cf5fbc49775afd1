"""MLflow bookkeeping: one parent run per sweep, one child run per trial.

Uses ``MlflowClient`` only (no global active run), so the driver and every trial process
talk to the store independently. A trial finds its child run again by its Ray trial id, so
a resumed trial keeps logging into the run it started, exactly once per step.
"""
from __future__ import annotations

import functools
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

STATUSES = ("running", "finished", "diverged", "errored")


@functools.lru_cache(maxsize=8)
def client_for(uri: str) -> MlflowClient:
    """One client per store and process: opening a sqlite store costs seconds, and Ray
    reuses trial processes across trials."""
    return MlflowClient(uri)


def resolve_uri(uri: str, base: Path | None = None) -> str:
    """Make a relative ``sqlite:///file.db`` absolute, so trial processes (whose working
    directory Ray may change) write to the same store as the driver."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        return prefix + str((base or Path.cwd()) / uri[len(prefix):])
    return uri


def artifact_location(uri: str) -> str | None:
    """Artifacts of a sqlite store go to ``mlartifacts/`` beside the database (MLflow's own
    default is ``./mlruns`` under whatever folder the driver runs in); a tracking server
    decides for itself (None)."""
    prefix = "sqlite:///"
    if not uri.startswith(prefix):
        return None
    return (Path(uri[len(prefix):]).parent / "mlartifacts").as_uri()


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


def study_parent(uri: str, study: str, parent_run_id: str | None, params: dict[str, Any],
                 artifacts: dict[str, Any]) -> tuple[str, str]:
    """(experiment id, parent run id): reuse ``parent_run_id`` when given (a resumed
    sweep), else create the experiment if needed and a new parent run."""
    client = client_for(uri)
    exp = client.get_experiment_by_name(study)
    exp_id = exp.experiment_id if exp else client.create_experiment(
        study, artifact_location=artifact_location(uri))
    if parent_run_id:
        client.set_terminated(parent_run_id, "RUNNING")
        return exp_id, parent_run_id
    run = client.create_run(exp_id, run_name=f"{study}-sweep-{time.strftime('%Y%m%d-%H%M%S')}",
                            tags={"gradstudy.kind": "study", "gradstudy.study": study})
    client.log_batch(run.info.run_id, params=[Param(k, str(v)) for k, v in params.items()])
    with tempfile.TemporaryDirectory() as tmp:
        for name, content in artifacts.items():
            path = Path(tmp) / name
            path.write_text(content if isinstance(content, str) else json.dumps(content, indent=1))
            client.log_artifact(run.info.run_id, str(path))
    return exp_id, run.info.run_id


def finish_parent(uri: str, parent_run_id: str, status: str = "FINISHED") -> None:
    client_for(uri).set_terminated(parent_run_id, status)


class TrialRun:
    """The child run of one trial."""

    def __init__(self, uri: str, experiment_id: str, parent_run_id: str, trial_id: str,
                 config: dict[str, Any], tags: dict[str, str]):
        self.client = client_for(uri)
        found = self.client.search_runs(
            [experiment_id],
            filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}' "
                          f"and tags.trial_id = '{trial_id}'", max_results=1)
        if found:
            self.run_id = found[0].info.run_id
            self.logged = {k: max(m.step for m in self.client.get_metric_history(self.run_id, k))
                           for k in found[0].data.metrics}
            self.client.set_terminated(self.run_id, "RUNNING")
        else:
            name = f"{config['arm']} lr={config['lr']:g} bs={config['batch_size']}"
            run = self.client.create_run(
                experiment_id, run_name=name,
                tags={"mlflow.parentRunId": parent_run_id, "gradstudy.kind": "trial",
                      "trial_id": trial_id, "status": "running", **tags})
            self.run_id = run.info.run_id
            self.logged: dict[str, int] = {}
            self.client.log_batch(self.run_id, params=[Param(k, str(v)[:6000])
                                                       for k, v in _flat_params(config).items()])

    def log(self, metrics: dict[str, float], step: int) -> None:
        """Log once per step: on resume, steps the store already holds are skipped (training
        is deterministic, so they would carry the same values)."""
        ts = int(time.time() * 1000)
        batch = [Metric(k, float(v), ts, step) for k, v in metrics.items()
                 if step > self.logged.get(k, -1)]
        for i in range(0, len(batch), 900):
            self.client.log_batch(self.run_id, metrics=batch[i:i + 900])

    def set_tag(self, key: str, value: str) -> None:
        self.client.log_batch(self.run_id, tags=[RunTag(key, value)])

    def log_json(self, name: str, obj: Any) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / name
            path.write_text(json.dumps(obj))
            self.client.log_artifact(self.run_id, str(path))

    def end(self, status: str) -> None:
        self.set_tag("status", status)
        self.client.set_terminated(self.run_id, "FAILED" if status == "errored" else "FINISHED")


def _flat_params(config: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in config.items() if not isinstance(v, dict)}
    out.update({f"opt.{k}": v for k, v in config.get("options", {}).items()})
    out.update({f"model.{k}": v for k, v in config.get("model_options", {}).items()})
    return out
