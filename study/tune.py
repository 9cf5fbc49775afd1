"""The study runner: a validated spec -> Ray Tune trials -> MLflow runs -> the first report.

Order of business, so bad input never starts anything: the spec is validated, the tracking
store is checked, GPUs asked for are checked against what the cluster has, the dataset is
prepared once on the driver (a missing dataset fails here), and only then do Ray trials
start. Running the same command again resumes: Tune restores the experiment from
``<storage>/<study>`` (finished trials are kept, unfinished ones continue from their
checkpoints) and the sweep's MLflow parent run is reused (its id is kept in
``<storage>/<study>/gradstudy.json``).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from study.spec import Spec, SpecError
from study.tracking import check_reachable, finish_parent, resolve_uri, study_parent

STATE_FILE = "gradstudy.json"


@dataclass
class StudyResult:
    name: str
    study_uri: str
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    statuses: dict[str, int] = field(default_factory=dict)
    report_dir: Path | None = None
    interrupted: bool = False


def spec_hash(spec: Spec) -> str:
    return hashlib.sha256(spec.model_dump_json().encode()).hexdigest()[:16]


def run_study(spec: Spec, spec_path: str | Path | None = None, *, address: str | None = None,
              storage: str | None = None, tracking_uri: str | None = None, fresh: bool = False,
              report: bool = True) -> StudyResult:
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # the compact status table below
    import ray
    from ray import tune

    from study.trial import load_splits, trainable

    uri = resolve_uri(tracking_uri or spec.tracking.uri)
    check_reachable(uri)
    store = Storage(storage or spec.storage, spec.name)
    _check_local_gpus(spec, address)
    load_splits(spec)  # generate / read the dataset once here: missing data fails now

    fingerprint = spec_hash(spec)
    state = store.read_state()
    if state and state.get("spec_hash") != fingerprint and not fresh:
        raise SpecError(f"{spec_path or spec.name}: the spec changed since the sweep stored in "
                        f"{store.study_uri}; run with --fresh to start a new sweep")
    if fresh:
        store.set_aside(time.strftime("%Y%m%d-%H%M%S"))
        state = None

    if not ray.is_initialized():
        # "local" always starts a private runtime: never attach to whatever cluster is running
        ray.init(address=address or "local", include_dashboard=False, log_to_driver=True,
                 runtime_env={"env_vars": {"PYTHONPATH": _pythonpath()}})
    _check_cluster_gpus(spec)

    spec_text = Path(spec_path).read_text() if spec_path else yaml.safe_dump(spec.model_dump())
    exp_id, parent = study_parent(
        uri, spec.name, state.get("parent_run_id") if state else None,
        params={"dataset": spec.dataset.name, "epochs": spec.epochs, "search": spec.search.kind,
                "num_trials": spec.num_trials(), "spec_hash": fingerprint},
        artifacts={"spec.yaml": spec_text, "grid.json": spec.trials()})
    store.write_state({"parent_run_id": parent, "experiment_id": exp_id, "tracking_uri": uri,
                       "spec_hash": fingerprint})

    arms = {a["arm"]: a for a in spec.arms()}
    fn = tune.with_parameters(trainable, spec=spec, arms=arms,
                              tracking={"uri": uri, "experiment_id": exp_id,
                                        "parent_run_id": parent})
    resources = {"cpu": spec.resources.cpu, "gpu": spec.resources.gpu}
    fn = tune.with_resources(fn, resources)
    if tune.Tuner.can_restore(store.study_uri):
        print(f"Resuming the study stored in {store.study_uri}")
        tuner = tune.Tuner.restore(store.study_uri, fn, resume_errored=True)
    else:
        tuner = _new_tuner(spec, fn, store.root_uri)
    try:
        grid = tuner.fit()
    except BaseException:
        finish_parent(uri, parent, "KILLED")
        raise
    statuses: dict[str, int] = {}
    for result in grid:
        status = ("errored" if result.error else
                  "diverged" if (result.metrics or {}).get("diverged") else "finished")
        statuses[status] = statuses.get(status, 0) + 1
    out = StudyResult(spec.name, store.study_uri, uri, exp_id, parent, statuses)
    if _unfinished(store.study_uri):
        # Tune returns normally on Ctrl-C: the sweep is interrupted, not finished.
        out.interrupted = True
        finish_parent(uri, parent, "KILLED")
        return out
    finish_parent(uri, parent)
    if report:
        from analysis.report import make_report

        out.report_dir = make_report(spec.name, tracking_uri=uri, results_dir=store.study_uri,
                                     parent_run_id=parent)
    return out


class Storage:
    """Where Tune keeps a study (a local folder or a ``s3://`` / ``gs://`` URI) and the
    sweep's state file beside it, through pyarrow's filesystems so both work the same."""

    def __init__(self, root: str, study: str):
        import pyarrow.fs

        self.root_uri = root if "://" in root else str(Path(root).resolve())
        self.study_uri = self.root_uri.rstrip("/") + "/" + study
        self.fs, self.path = pyarrow.fs.FileSystem.from_uri(
            self.study_uri if "://" in self.study_uri else "file://" + self.study_uri)

    def exists(self) -> bool:
        import pyarrow.fs

        return self.fs.get_file_info(self.path).type != pyarrow.fs.FileType.NotFound

    def read_state(self) -> dict[str, Any] | None:
        try:
            with self.fs.open_input_stream(f"{self.path}/{STATE_FILE}") as f:
                return json.loads(f.read().decode())
        except (FileNotFoundError, OSError):
            return None

    def write_state(self, state: dict[str, Any]) -> None:
        self.fs.create_dir(self.path, recursive=True)
        with self.fs.open_output_stream(f"{self.path}/{STATE_FILE}") as f:
            f.write(json.dumps(state, indent=1).encode())

    def set_aside(self, stamp: str) -> None:
        """--fresh: keep the old sweep's folder, renamed, instead of deleting anything."""
        if self.exists():
            self.fs.move(self.path, f"{self.path}.{stamp}")


def _unfinished(study_uri: str) -> int:
    """Trials the saved experiment state still lists as to be run. (After Ctrl-C, Tune's
    in-memory results call every trial terminated; the state it saved for resuming does not.)"""
    import logging

    from ray.tune import ExperimentAnalysis

    quiet = logging.getLogger("ray.tune.analysis.experiment_analysis")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # it warns about every trial without results yet
    try:
        trials = ExperimentAnalysis(study_uri).trials
    finally:
        quiet.setLevel(level)
    return sum(t.status not in ("TERMINATED", "ERROR") for t in trials)


def _new_tuner(spec: Spec, fn, storage_path: str):
    from ray import tune

    search_alg, param_space, num_samples = None, {"trial": tune.grid_search(spec.trials())}, 1
    if spec.search.kind == "optuna":
        search_alg, param_space = _optuna(spec), {}
        num_samples = spec.search.num_samples
    scheduler = None
    if spec.scheduler.kind == "asha":
        from ray.tune.schedulers import ASHAScheduler

        scheduler = ASHAScheduler(time_attr="training_iteration", max_t=spec.epochs,
                                  grace_period=spec.scheduler.grace_period,
                                  reduction_factor=spec.scheduler.reduction_factor)
    return tune.Tuner(
        fn, param_space=param_space,
        tune_config=tune.TuneConfig(
            metric=spec.search.metric, mode=spec.search.mode, search_alg=search_alg,
            scheduler=scheduler, num_samples=num_samples,
            max_concurrent_trials=spec.resources.max_concurrent,
            reuse_actors=True,  # a fresh worker costs seconds of imports per trial
            trial_dirname_creator=_dirname),
        run_config=tune.RunConfig(
            name=spec.name, storage_path=storage_path, verbose=1, progress_reporter=_reporter(spec),
            failure_config=tune.FailureConfig(max_failures=spec.max_failures),
            # Keep every (small) epoch checkpoint: pruning forces an experiment snapshot per
            # checkpoint, which throttles short trials.
            checkpoint_config=tune.CheckpointConfig(num_to_keep=None)))


def _reporter(spec: Spec):
    """Progress on the terminal: one row per trial, its arm, lr, batch size and metrics."""
    from ray.tune import CLIReporter

    params = ({"trial/arm": "arm", "trial/lr": "lr", "trial/batch_size": "bs"}
              if spec.search.kind == "grid" else {"arm": "arm", "batch_size": "bs"})
    return CLIReporter(parameter_columns=params, max_report_frequency=15,
                       metric_columns={"epoch": "epoch", spec.search.metric: spec.search.metric,
                                       "test_accuracy": "test_acc", "train_loss": "train_loss"},
                       sort_by_metric=True, max_progress_rows=12, max_error_rows=5)


def _optuna(spec: Spec):
    """Define-by-run space: an arm (model/family/variant/options), then that family's lr
    (log-uniform over its grid's range), a batch size and a seed."""
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    arms = spec.arms()
    labels = [a["arm"] for a in arms]
    families = {a["arm"]: a["family"] for a in arms}

    def space(trial):
        arm = trial.suggest_categorical("arm", labels)
        lrs = spec.lr_grid(families[arm])
        trial.suggest_float(f"lr[{families[arm]}]", min(lrs), max(lrs), log=True)
        trial.suggest_categorical("batch_size", list(spec.batch_size))
        trial.suggest_categorical("seed", list(spec.seeds))

    sampler = (optuna.samplers.TPESampler(seed=spec.search.seed) if spec.search.sampler == "tpe"
               else optuna.samplers.RandomSampler(seed=spec.search.seed))
    return OptunaSearch(space=space, metric=spec.search.metric, mode=spec.search.mode,
                        sampler=sampler)


def _dirname(trial) -> str:
    cfg = trial.config.get("trial", trial.config)
    label = re.sub(r"[^A-Za-z0-9_.=-]+", "_", str(cfg.get("arm", "trial")))
    return f"{label}_{trial.trial_id}"[:120]


def _pythonpath() -> str:
    """Trial workers import what the driver can: the working folder and its PYTHONPATH."""
    parts = [os.getcwd(), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    return os.pathsep.join(dict.fromkeys(parts))


def _check_local_gpus(spec: Spec, address: str | None) -> None:
    if spec.resources.gpu > 0 and address is None:
        import torch

        if not torch.cuda.is_available():
            raise SpecError(f"resources.gpu: {spec.resources.gpu} GPU per trial requested, but "
                            "this machine has no GPU (set resources.gpu: 0)")


def _check_cluster_gpus(spec: Spec) -> None:
    import ray

    have = ray.cluster_resources().get("GPU", 0)
    if spec.resources.gpu > 0 and have == 0:
        raise SpecError(f"resources.gpu: {spec.resources.gpu} GPU per trial requested, but the "
                        "Ray cluster has no GPUs; trials would wait forever (set resources.gpu: 0)")
