"""The study runner: a validated spec -> Ray Tune trials -> MLflow runs.

Order of business, so bad input never starts anything: the spec is validated (by the
caller), GPUs asked for are checked against the machine, the storage is checked writable,
the dataset is prepared once on the driver (a missing dataset fails here), the tracking
store is opened while Ray's runtime starts (a runtime started here is shut down again if the
store fails), and only then does the sweep record anything or start a trial. Running the same
command again resumes: Tune restores the experiment from ``<storage>/<study>`` (finished
trials are kept, unfinished ones continue from their checkpoints) and the sweep's MLflow
parent run is reused (its id is kept in ``<storage>/<study>/gradstudy.json``). The report is
the caller's next step (``study.cli``).
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import signal
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from ray.tune import Callback

from study import contract as C
from study.plugins import plugin_folders
from study.spec import Spec, SpecError
from study.storage import STATE_FILE, Storage, TrialFiles  # noqa: F401 - STATE_FILE for tests
from study.tracking import (
    check_reachable,
    check_sqlite_file,
    children,
    client_for,
    find_trial_run,
    finish_parent,
    log_dataset,
    mark_interrupted,
    open_store,
    resolve_uri,
    settle,
    study_parent,
)

FRESH_HINT = "make sweep SPACE=<file> FRESH=1, or python -m study sweep <file> --fresh"


@dataclass
class StudyResult:
    name: str
    study_uri: str
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    statuses: dict[str, int] = field(default_factory=dict)   # trial runs by status tag
    seconds: float = 0.0
    interrupted: bool = False


def spec_hash(spec: Spec) -> str:
    """What a resumed sweep must share with the stored one (raising the trial limit, adding a
    claim or checkpointing more or less often is not a change of study; evaluating at its
    default, every epoch, hashes as before the option existed)."""
    exclude: dict = {"search": {"max_trials"}, "claims": True, "checkpoint": True}
    if spec.evaluate == type(spec.evaluate)():
        exclude["evaluate"] = True
    dumped = spec.model_dump_json(exclude=exclude)
    return hashlib.sha256(dumped.encode()).hexdigest()[:16]


def run_study(spec: Spec, spec_path: str | Path | None = None, *, address: str | None = None,
              storage: str | None = None, tracking_uri: str | None = None,
              fresh: bool = False) -> StudyResult:
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # the compact status table below
    started = time.monotonic()
    from study.trial import load_splits

    uri = resolve_uri(tracking_uri or spec.tracking.uri)
    _check_local_gpus(spec, address)
    check_reachable(uri)
    check_sqlite_file(uri)
    store = Storage(storage or spec.storage, spec.name)
    store.check_writable()
    fingerprint = spec_hash(spec)
    state = None if fresh else store.read_state()
    if state and state.get("spec_hash") != fingerprint:
        raise SpecError(f"{spec_path or spec.name}: the spec changed since the sweep stored in "
                        f"{store.study_uri}; start a new sweep with {FRESH_HINT}")
    if state and state.get("tracking_uri", uri) != uri:
        raise SpecError(f"tracking.uri: the sweep stored in {store.study_uri} logs to "
                        f"{state['tracking_uri']}, not {uri}; resume with that URI or start a "
                        f"new sweep with {FRESH_HINT}")
    spec = _absolute_data_root(spec)   # after the hash: the spec as written identifies a sweep
    load_splits(spec.dataset)  # generate / read the dataset once here: missing data fails now
    with ThreadPoolExecutor(1) as pool:   # both take seconds, mostly waiting on other processes
        opened = pool.submit(open_store, uri, spec.name)
        started_ray = _start_ray(spec, address)
        try:
            exp_id = opened.result()
        except BaseException:
            if started_ray:
                import ray

                ray.shutdown()
            raise
    if fresh:
        store.set_aside(time.strftime("%Y%m%d-%H%M%S"))
    _check_cluster_gpus(spec)

    spec_text = Path(spec_path).read_text() if spec_path else yaml.safe_dump(spec.model_dump())
    parent = study_parent(
        uri, exp_id, spec.name, state.get("parent_run_id") if state else None,
        params={"dataset": spec.dataset.name, "epochs": spec.epochs, "search": spec.search.kind,
                "scheduler": spec.scheduler.kind, "num_trials": spec.num_trials(),
                "spec_hash": fingerprint},
        artifacts={C.SPEC_ARTIFACT: spec_text,
                   **({C.GRID_ARTIFACT: spec.trials()} if spec.search.kind == "grid" else {})})
    out = StudyResult(spec.name, store.study_uri, uri, exp_id, parent)
    try:
        store.write_state({"parent_run_id": parent, "experiment_id": exp_id,
                           "tracking_uri": uri, "spec_hash": fingerprint})
        mark_interrupted(uri, exp_id, parent)   # left running by a sweep that was killed
        _declare_dataset(spec, uri, parent)
        tuner = _tuner(spec, store, uri, exp_id, parent)
        with _quiet_ray_hints(), _own_sigint():
            tuner.fit()
        out.interrupted = _unfinished(store.study_uri, spec.num_trials()) > 0
    except BaseException:
        mark_interrupted(uri, exp_id, parent)
        finish_parent(uri, parent, "KILLED")
        raise
    if out.interrupted:   # Tune returns normally on Ctrl-C: the sweep is interrupted
        mark_interrupted(uri, exp_id, parent)
    finish_parent(uri, parent, "KILLED" if out.interrupted else "FINISHED")
    out.statuses = dict(Counter(r.data.tags.get(C.TAG_STATUS, C.RUNNING)
                                for r in children(uri, exp_id, parent)))
    out.seconds = time.monotonic() - started
    return out


def _absolute_data_root(spec: Spec) -> Spec:
    """``dataset.root`` made absolute against the driver's working directory: Tune runs each
    trial in a folder of its own, where a relative root named nothing (seen: every worker
    generated MNIST-1D again under its trial's folder, 40 s of a trial's wall time; image
    datasets would not be found at all)."""
    root = str(Path(spec.dataset.root).resolve())
    return spec.model_copy(update={"dataset": spec.dataset.model_copy(update={"root": root})})


def _declare_dataset(spec: Spec, uri: str, parent: str) -> None:
    """The study's dataset as an input of the parent run, before any trial starts: the store
    then holds the experiment's dataset record, which trials starting at once would
    otherwise each try to create (seen: a trial failing on the sqlite store's unique key)."""
    from study.trainable import dataset_identity

    log_dataset(client_for(uri), parent, **dataset_identity(spec.dataset), context="study")


def _tuner(spec: Spec, store: Storage, uri: str, exp_id: str, parent: str):
    from ray import tune

    from study.search import LeanTrialState, new_tuner
    from study.trainable import trainable

    arms = {a["arm"]: a for a in spec.arms()}
    files = {"root": store.root_uri, "study": spec.name}
    fn = tune.with_parameters(trainable, spec=spec, arms=arms,
                              tracking={"uri": uri, "experiment_id": exp_id,
                                        "parent_run_id": parent}, storage=files)
    fn = tune.with_resources(fn, {"cpu": spec.resources.cpu, "gpu": spec.resources.gpu})
    if tune.Tuner.can_restore(store.study_uri):
        print(f"Resuming the study stored in {store.study_uri}")
        return tune.Tuner.restore(store.study_uri, fn, resume_errored=True)
    outcomes = TrialOutcomes(uri, exp_id, parent, spec.epochs, files)
    return new_tuner(spec, fn, store.root_uri, callbacks=[outcomes, LeanTrialState(spec)])


class TrialOutcomes(Callback):
    """On the driver: the final status of every trial Tune ends, written to its MLflow run.
    A trial that ends by itself writes its own; one that Tune stops (ASHA, or the end of the
    sweep) or that fails for good is settled here. Kept in Tune's experiment state (plain
    data only), so a resumed sweep settles its trials the same way."""

    def __init__(self, uri: str, experiment_id: str, parent_run_id: str, epochs: int,
                 storage: dict[str, str]):
        self.uri, self.experiment_id = uri, experiment_id
        self.parent_run_id, self.epochs, self.storage = parent_run_id, epochs, storage

    def on_trial_complete(self, iteration, trials, trial, **info):
        result = trial.last_result or {}
        if not result.get(C.RUN_ID_KEY):
            return   # never reported: a trial removed before it started has no run
        if result.get(C.DIVERGED_FLAG):
            status = C.DIVERGED
        elif result.get(C.EPOCH, 0) >= self.epochs or result.get(C.REACHED_TARGET):
            status = C.FINISHED       # every epoch, or the spec's stop target reached
        else:
            status = C.STOPPED
        settle(self.uri, result[C.RUN_ID_KEY], status)

    def on_trial_error(self, iteration, trials, trial, **info):
        run_id = (trial.last_result or {}).get(C.RUN_ID_KEY)
        storage = getattr(self, "storage", None)   # None: pickled by an older sweep
        if run_id is None and storage:
            run_id = TrialFiles(Storage(**storage), trial.trial_id).run_id()
        elif run_id is None:
            run = find_trial_run(self.uri, self.experiment_id, self.parent_run_id,
                                 trial.trial_id)
            run_id = run.info.run_id if run else None
        if run_id:
            settle(self.uri, run_id, C.ERRORED)


class _DropRayHints(logging.Filter):
    """Ray's own advice on an interrupted run ("Resume experiment with: Tuner.restore(...)")
    contradicts ours (run the same command again); the CLI says what to do instead."""

    HINTS = ("Tuner.restore", "Resume experiment with", "Stop signal received",
             "Trials did not complete",
             "Failed to fetch metrics")   # trials an interrupted sweep had not started yet

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(hint in message for hint in self.HINTS)


@contextlib.contextmanager
def _quiet_ray_hints():
    drop = _DropRayHints()
    loggers = [logging.getLogger(name)
               for name in ("ray.tune.tune", "ray.tune.execution.tune_controller",
                            "ray.tune.analysis.experiment_analysis")]
    for logger in loggers:
        logger.addFilter(drop)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(drop)


@contextlib.contextmanager
def _own_sigint():
    """Tune installs its own Ctrl-C handler and leaves it behind when the sweep ends without
    one; put ours back, so a Ctrl-C after the sweep (during the report) stops the program."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = signal.getsignal(signal.SIGINT)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, before)


def _unfinished(study_uri: str, expected: int) -> int:
    """Trials still to run according to the experiment state Tune saved: those not ended,
    plus those the search has not created yet (Optuna creates trials one by one, so a sweep
    stopped between two of them has no unfinished trial in the state). (After Ctrl-C, Tune's
    in-memory results call every trial terminated; the saved state does not.)"""
    from ray.tune import ExperimentAnalysis

    with _quiet_ray_hints():
        trials = ExperimentAnalysis(study_uri).trials
    not_ended = sum(t.status not in ("TERMINATED", "ERROR") for t in trials)
    return not_ended + max(0, expected - len(trials))


def _start_ray(spec: Spec, address: str | None) -> bool:
    """Ray's runtime for the study, unless the caller started one; True when started here.
    "local" (no address) always starts a private runtime: never attach to whatever cluster is
    running. (The workers Ray starts with its runtime never take a trial: Tune gives its trial
    actors a runtime env of their own, and Ray gives an actor only a worker started for that
    env; importing torch and MLflow in them ahead, ``preload_python_modules``, measured slower.)"""
    import ray

    if ray.is_initialized():
        return False
    ray.init(address=address or "local", include_dashboard=False, log_to_driver=True,
             runtime_env={"env_vars": {"PYTHONPATH": _pythonpath(spec)}})
    return True


def _pythonpath(spec: Spec) -> str:
    """Trial workers import what the driver can: the working folder, its PYTHONPATH and the
    folders of plugins given as files."""
    parts = [os.getcwd(), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep)),
             *plugin_folders(spec.plugins)]
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
