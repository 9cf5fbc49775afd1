"""Read a study's trials into two pandas frames, from MLflow or from Ray Tune's results folder.

Only the names in the study/analysis contract (``study/contract.py``: statuses, tags, metric
keys, artifact names) are relied on, so that the analysis never imports the training code.
Both loaders return the same shape:

- ``trials``: one row per trial: config columns (lr, batch_size, seed, family, variant, model,
  arm, dataset, opt.*, model.*), the last logged value of every metric, status, run_id.
- ``metrics``: long frame of every logged metric value: run_id, key, step, value.
"""
from __future__ import annotations

import json
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pandas as pd

from study import contract as C

log = logging.getLogger(__name__)

METRIC_COLUMNS = ["run_id", "key", "step", "value"]
_INT_PARAMS = ("batch_size", "seed", "epochs")
_FLOAT_PARAMS = ("lr",)
_STUDY_PARAMS = ("dataset", "epochs")
_TAG_COLUMNS = (*C.TRIAL_TAGS, C.TAG_TRIAL_ID, C.TAG_STATUS)
_TUNE_BOOKKEEPING = {
    "config", "training_iteration", "trial_id", "done", "timestamp", "date", "pid",
    "hostname", "node_ip", "time_this_iter_s", "time_total_s", "time_since_restore",
    "iterations_since_restore", "checkpoint_dir_name", "should_checkpoint", "experiment_tag",
}
_STEP_KEYS = ("step", C.ITERATION, "global_step")
_NAME_KEYS = ("arm", "family", "variant", "model", "dataset")


class StudyNotFoundError(FileNotFoundError):
    """The study's runs are not where we looked (no experiment, no sweep, no results)."""


def _number(text):
    """Params arrive as strings; keep numbers numeric so grouping and sorting work."""
    if not isinstance(text, str):
        return text
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"True": True, "False": False, "None": None}.get(text, text)


def _normalise_trials(trials: pd.DataFrame) -> pd.DataFrame:
    """Give both loaders' output the same dtypes and derived columns."""
    for col in _FLOAT_PARAMS:
        if col in trials:
            trials[col] = pd.to_numeric(trials[col], errors="coerce")
    for col in _INT_PARAMS:
        if col in trials:
            trials[col] = pd.to_numeric(trials[col], errors="coerce").astype("Int64")
    for col in ("family", "variant", "model"):
        if col not in trials:
            trials[col] = "default" if col == "variant" else "unknown"
        trials[col] = trials[col].fillna("default" if col == "variant" else "unknown")
    if "dataset" not in trials:
        trials["dataset"] = "unknown"
    trials["dataset"] = trials["dataset"].fillna("unknown")
    if "arm" not in trials:
        trials["arm"] = trials["model"] + "/" + trials["family"] + "/" + trials["variant"]
    trials["arm"] = trials["arm"].fillna(
        trials["model"] + "/" + trials["family"] + "/" + trials["variant"])
    if "status" not in trials:
        trials["status"] = C.FINISHED
    trials["status"] = trials["status"].fillna(C.FINISHED)
    return trials.reset_index(drop=True)


# ---------------------------------------------------------------- MLflow


def _client(tracking_uri):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri)


def find_parent_run(client, experiment_id: str, parent_run_id: str | None = None):
    """The sweep's parent run: the one given, else the latest run tagged as a study."""
    if parent_run_id:
        return client.get_run(parent_run_id)
    parents = client.search_runs(
        [experiment_id], filter_string=f"tags.`{C.TAG_KIND}` = '{C.KIND_STUDY}'",
        order_by=["attributes.start_time DESC"], max_results=1)
    if parents:
        return parents[0]
    # Older or hand-made stores: the latest run that some other run names as its parent.
    runs = client.search_runs([experiment_id], order_by=["attributes.start_time DESC"])
    named = {r.data.tags.get(C.TAG_PARENT) for r in runs} - {None}
    for run in runs:
        if run.info.run_id in named:
            return run
    return None


def _search_all(client, experiment_id, filter_string):
    runs, token = [], None
    while True:
        page = client.search_runs([experiment_id], filter_string=filter_string,
                                  max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


# An MLflow run status read beside a trial whose status tag still says running (or has none):
# the sweep ended without the trial settling its own tag.
_UNSETTLED = {"KILLED": C.INTERRUPTED, "FAILED": C.ERRORED}


def _mlflow_trial_status(tag: str | None, run_status: str) -> str | None:
    """The trial's status: its tag, unless the tag is missing or still ``running`` while
    MLflow says the run was killed (-> interrupted) or failed (-> errored)."""
    if tag in (None, C.RUNNING) and run_status in _UNSETTLED:
        return _UNSETTLED[run_status]
    return tag


def _history(client, run_id, key):
    return [(run_id, key, m.step, m.value) for m in client.get_metric_history(run_id, key)]


def load_mlflow(study: str, tracking_uri: str | None = None, parent_run_id: str | None = None,
                history_keys: list[str] | None = None):
    """Trials of the study's latest (or given) sweep from an MLflow store.

    ``history_keys`` limits which metric histories are fetched (all when None); the final
    value of every metric is always present in ``trials``.
    """
    client = _client(tracking_uri)
    experiment = client.get_experiment_by_name(study)
    if experiment is None:
        raise StudyNotFoundError(f"study {study!r}: no MLflow experiment of that name at "
                         f"{tracking_uri or 'the default tracking URI'}")
    parent = find_parent_run(client, experiment.experiment_id, parent_run_id)
    if parent is None:
        raise StudyNotFoundError(f"study {study!r}: no parent (sweep) run in the experiment")
    pid = parent.info.run_id
    runs = _search_all(client, experiment.experiment_id, f"tags.`{C.TAG_PARENT}` = '{pid}'")
    rows = []
    for run in runs:
        # study-wide params (dataset, epochs) may be logged on the parent only
        row = {k: _number(v) for k, v in parent.data.params.items() if k in _STUDY_PARAMS}
        row.update({k: _number(v) for k, v in run.data.params.items()})
        for tag in _TAG_COLUMNS:
            if tag in run.data.tags:
                row[tag] = run.data.tags[tag]
        _add_finals(row, run.data.metrics, configured=set(run.data.params))
        row["status"] = _mlflow_trial_status(row.get("status"), run.info.status)
        row["run_id"] = run.info.run_id
        row["parent_run_id"] = pid
        rows.append(row)
    trials = _normalise_trials(pd.DataFrame(rows)) if rows else pd.DataFrame(
        columns=["run_id", "family", "variant", "model", "arm", "dataset", "status"])
    jobs = [(r.info.run_id, key) for r in runs for key in r.data.metrics
            if history_keys is None or key in history_keys]
    with ThreadPoolExecutor(max_workers=4) as pool:
        parts = list(pool.map(lambda job: _history(client, *job), jobs))
    metrics = pd.DataFrame([p for part in parts for p in part], columns=METRIC_COLUMNS)
    trials.attrs.update(source="mlflow", tracking_uri=tracking_uri, parent_run_id=pid,
                        study=study)
    return trials, metrics


def download_grad_hist(tracking_uri: str | None, run_id: str, dst: Path) -> dict | None:
    """The run's ``grad_hist.json`` artifact (``contract.GRAD_HIST``), or None without one."""
    from mlflow.exceptions import MlflowException

    client = _client(tracking_uri)
    try:
        names = {a.path for a in client.list_artifacts(run_id)}
        if C.GRAD_HIST not in names:
            return None
        dst.mkdir(parents=True, exist_ok=True)
        local = client.download_artifacts(run_id, C.GRAD_HIST, str(dst))
    except (MlflowException, OSError) as err:  # store unreachable: skip the figure, not the report
        log.warning("%s of run %s could not be downloaded: %s", C.GRAD_HIST, run_id, err)
        return None
    return json.loads(Path(local).read_text())


def download_text(tracking_uri: str | None, run_id: str, name: str) -> str | None:
    """A text artifact of a run (the parent's ``spec.yaml``), or None without one."""
    import tempfile

    from mlflow.exceptions import MlflowException

    client = _client(tracking_uri)
    try:
        if name not in {a.path for a in client.list_artifacts(run_id)}:
            return None
        with tempfile.TemporaryDirectory() as tmp:
            return Path(client.download_artifacts(run_id, name, tmp)).read_text()
    except (MlflowException, OSError, UnicodeDecodeError) as err:
        log.warning("%s of run %s could not be read: %s", name, run_id, err)
        return None


# ---------------------------------------------------------------- Ray Tune


def _read_result_lines(path: Path) -> list[dict]:
    rows = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a trial killed mid-write leaves a partial line
                log.warning("skipping a malformed line in %s", path)
    return rows


def _add_finals(row: dict, finals: dict, configured: set) -> None:
    """Final metric values; a metric named like a config param (``lr``, possibly scheduled)
    goes to ``<name>_final`` so the configured value stays the one trials are grouped by."""
    for key, value in finals.items():
        row[f"{key}_final" if key in configured else key] = value


def _flatten_config(config: dict) -> dict:
    """Tune's config (params.json) in the same column names as the MLflow params. Grid
    configs nest the trial under ``trial``; Optuna's name the LR ``lr[<family>]``."""
    if isinstance(config.get("trial"), dict):
        config = config["trial"]
    row = {}
    for key, value in config.items():
        if C.parse_optuna_lr_key(key) is not None:
            row["lr"] = value
            continue
        if key == "options" and isinstance(value, dict):
            row.update({f"opt.{k}": v for k, v in value.items()})
        elif key == "model_options" and isinstance(value, dict):
            row.update({f"model.{k}": v for k, v in value.items()})
        elif not isinstance(value, (dict, list)):
            row[key] = value
    return row


def _names_from_arm(row: dict) -> None:
    """'<model>/<family>/<variant>...' fills model/family/variant a config did not carry."""
    parts = str(row.get("arm", "")).split("/", 2)
    if len(parts) == 3:
        for key, value in zip(("model", "family", "variant"), parts):
            row.setdefault(key, value)


def _tune_status(trial_dir: Path, results: list[dict]) -> str:
    if (trial_dir / "error.txt").exists() or (trial_dir / "error.pkl").exists():
        return C.ERRORED
    diverged = [r.get("diverged") for r in results if r.get("diverged") is not None]
    if diverged and diverged[-1]:
        return C.DIVERGED
    return C.FINISHED if results else C.ERRORED


def _last_epoch(results: list[dict]) -> float:
    epochs = [r[C.EPOCH] for r in results if isinstance(r.get(C.EPOCH), (int, float))]
    return max(epochs) if epochs else float("nan")


def _short_trials(rows: list[dict], last_epochs: list[float], done: list[bool]) -> None:
    """Tune's folder has no status of its own: a trial that ended cleanly before the study's
    last epoch (its ``epochs`` param, else the most any trial trained) was stopped by the
    scheduler when Tune marked its last result done, else the sweep was interrupted."""
    known = [e for e in last_epochs if e == e]
    configured = [r["epochs"] for r in rows if isinstance(r.get("epochs"), (int, float))]
    full = max(configured) if configured else max(known, default=float("nan"))
    for row, last, was_done in zip(rows, last_epochs, done):
        if row["status"] == C.FINISHED and last < full:
            row["status"] = C.STOPPED if was_done else C.INTERRUPTED


def load_tune(results_dir: str | Path):
    """The same two frames from a Tune results folder (``<storage>/<study>/``)."""
    results_dir = Path(results_dir)
    files = sorted(results_dir.glob("*/result.json"))
    if not files:
        raise StudyNotFoundError(f"results folder {results_dir}: no <trial>/result.json in it")
    rows, points, last_epochs, done = [], [], [], []
    for path in files:
        trial_dir = path.parent
        results = _read_result_lines(path)
        params_file = trial_dir / "params.json"
        if params_file.exists():
            config = json.loads(params_file.read_text())
        else:
            config = results[0].get("config", {}) if results else {}
        run_id = (results[0].get("trial_id") if results else None) or trial_dir.name
        row = _flatten_config(config)
        configured, finals = set(row), {}
        for i, result in enumerate(results):
            step = next((result[k] for k in _STEP_KEYS if k in result),
                        result.get("training_iteration", i + 1))
            for key, value in result.items():
                if key in _TUNE_BOOKKEEPING or key in _STEP_KEYS:
                    continue
                if isinstance(value, str) and key in _NAME_KEYS:  # arm/family of Optuna trials
                    row.setdefault(key, value)
                if isinstance(value, bool):
                    value = float(value)
                if isinstance(value, (int, float)):  # NaN kept: a diverged loss is a result
                    points.append((run_id, key, step, float(value)))
                    finals[key] = float(value)
        _add_finals(row, finals, configured)
        _names_from_arm(row)
        row.update(run_id=run_id, trial_id=run_id, status=_tune_status(trial_dir, results))
        rows.append(row)
        last_epochs.append(_last_epoch(results))
        done.append(bool(results and results[-1].get("done")))
    _short_trials(rows, last_epochs, done)
    trials = _normalise_trials(pd.DataFrame(rows))
    metrics = pd.DataFrame(points, columns=METRIC_COLUMNS)
    trials.attrs.update(source="tune", results_dir=str(results_dir), study=results_dir.name)
    return trials, metrics
