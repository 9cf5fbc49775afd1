"""How a spec becomes a Ray Tune experiment: the search (a grid, or Optuna's define-by-run
space), the scheduler (none, or ASHA), the terminal progress table, trial folder names and
what Tune keeps of each trial in its experiment state.

Tune pickles the searcher and the scheduler into its experiment state (that is how a sweep
resumes), so everything here that Tune keeps is a module-level class holding plain data.
"""
from __future__ import annotations

import json
import re
from typing import Any

from ray.tune import Callback

from study import contract as C
from study.contract import optuna_lr_key
from study.spec import Spec

TABLE_METRICS = (C.TEST_ACCURACY, C.TRAIN_LOSS)   # the progress table's other metric columns


class OptunaSpace:
    """Optuna's define-by-run space: an arm (model / family / variant / options), then that
    family's own learning rate (log-uniform over its grid's range), a batch size and a seed.
    The lr parameter is conditional on the family, so TPE models each family's lr apart."""

    def __init__(self, spec: Spec):
        arms = spec.arms()
        self.labels = [a["arm"] for a in arms]
        self.family = {a["arm"]: a["family"] for a in arms}
        self.lr_range = {f: (min(spec.lr_grid(f)), max(spec.lr_grid(f)))
                         for f in dict.fromkeys(self.family.values())}
        self.batch_sizes = list(spec.batch_size)
        self.seeds = list(spec.seeds)

    def __call__(self, trial) -> None:
        arm = trial.suggest_categorical("arm", self.labels)
        low, high = self.lr_range[self.family[arm]]
        trial.suggest_float(optuna_lr_key(self.family[arm]), low, high, log=True)
        trial.suggest_categorical("batch_size", self.batch_sizes)
        trial.suggest_categorical("seed", self.seeds)


GRID_KEY = "grid_point"      # a grid trial's "<index>:<arm>", Tune's grid axis


class GridPoint:
    """A grid trial's point, looked up by its index (``GRID_KEY``) when Tune adds the trial.
    Tune deep-copies its unresolved search space for every trial it generates (all at once,
    when the study starts): with the points as the grid's values that copied n of them per
    trial, O(n^2) in the study (5 ms a trial at 2,000 trials); a list of short strings
    copies in a fraction of that. The arm in the key names the trial's folder before Tune
    has looked its point up."""

    def __init__(self, points: list[dict[str, Any]]):
        self.points = points

    def __call__(self, config: dict[str, Any]) -> dict[str, Any]:
        return self.points[int(config[GRID_KEY].split(":", 1)[0])]


def searcher(spec: Spec):
    """(search algorithm or None, param_space, num_samples) for ``spec.search``. A grid
    trial's config holds its point under ``trial`` (and its key, ``GRID_KEY``)."""
    from ray import tune

    if spec.search.kind == "grid":
        points = spec.trials()
        keys = [f"{i}:{p['arm']}" for i, p in enumerate(points)]
        return None, {GRID_KEY: tune.grid_search(keys),
                      "trial": tune.sample_from(GridPoint(points))}, 1
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # one line per trial is Tune's job
    sampler = (optuna.samplers.TPESampler(seed=spec.search.seed) if spec.search.sampler == "tpe"
               else optuna.samplers.RandomSampler(seed=spec.search.seed))
    search = OptunaSearch(space=OptunaSpace(spec), metric=spec.search.metric,
                          mode=spec.search.mode, sampler=sampler)
    return search, {}, spec.search.num_samples


def scheduler(spec: Spec):
    """ASHA over epochs (the trial's own count: Tune's training_iteration restarts when a
    resumed trial continues from its checkpoint file, and skips epochs that do not evaluate),
    or None."""
    if spec.scheduler.kind == "none":
        return None
    from ray.tune.schedulers import ASHAScheduler

    return ASHAScheduler(time_attr=C.EPOCH, max_t=spec.epochs,
                         grace_period=spec.scheduler.grace_period,
                         reduction_factor=spec.scheduler.reduction_factor)


def new_tuner(spec: Spec, fn, storage_path: str, callbacks: list):
    from ray import tune

    search_alg, param_space, num_samples = searcher(spec)
    return tune.Tuner(
        fn, param_space=param_space,
        tune_config=tune.TuneConfig(
            metric=spec.search.metric, mode=spec.search.mode, search_alg=search_alg,
            scheduler=scheduler(spec), num_samples=num_samples,
            max_concurrent_trials=spec.resources.max_concurrent,
            reuse_actors=True,  # a fresh worker costs seconds of imports per trial
            trial_dirname_creator=trial_dirname),
        run_config=tune.RunConfig(
            name=spec.name, storage_path=storage_path, verbose=1, progress_reporter=reporter(spec),
            failure_config=tune.FailureConfig(max_failures=spec.max_failures),
            # Tune's loggers first: they write whole results before LeanTrialState trims them.
            callbacks=[*_loggers(), *callbacks],
            # Keep each trial's last checkpoint. Pruning makes Tune snapshot its whole
            # experiment state whenever a trial has checkpointed num_to_keep times: a snapshot
            # per checkpoint, each as large as the state (trials x epochs of bookkeeping, when
            # trials checkpointed every epoch): quadratic, which throttled short trials. Now
            # checkpoint.every_s keeps checkpoints rare and LeanTrialState the state small.
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1)))


def _loggers() -> list:
    """Tune's default result loggers (result.json, progress.csv, TensorBoard events where
    tensorboardX is installed), which Tune would otherwise add after our callbacks."""
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback, TBXLoggerCallback

    loggers = [CSVLoggerCallback(), JsonLoggerCallback()]
    try:
        import tensorboardX  # noqa: F401
    except ImportError:
        return loggers
    return [*loggers, TBXLoggerCallback()]


class LeanTrialState(Callback):
    """Tune rewrites its whole experiment state at every snapshot; keep each trial's share
    small and flat. A trial's last result (and its kept checkpoint's copy) keeps what Tune,
    the progress table and ``TrialOutcomes`` read (result.json, written before, keeps
    everything; of the result's copy of the config, the table's columns), and Tune's running
    statistics of every metric of every trial (min/max/avg/last-5/last-10; ~0.6 KB a metric,
    never read here: the analysis reads MLflow) are dropped after each step, for the trials
    that had an event in it (all of them at the first step, which may follow a restore):
    O(1) per event, not O(trials) per step. Tune caches each trial's JSON indented by two
    spaces (a seventh of it whitespace); the cached texts are stored compact instead."""

    def __init__(self, spec: Spec):
        from ray.tune.result import (
            DONE,
            NODE_IP,
            PID,
            SHOULD_CHECKPOINT,
            TIME_TOTAL_S,
            TRAINING_ITERATION,
        )

        self.keep = frozenset({DONE, SHOULD_CHECKPOINT, TRAINING_ITERATION, TIME_TOTAL_S,
                               NODE_IP, PID, "config",     # read by the progress table
                               # read by TrialOutcomes to settle a trial's status
                               C.RUN_ID_KEY, C.EPOCH, C.DIVERGED_FLAG, C.REACHED_TARGET,
                               spec.search.metric, *TABLE_METRICS})
        self.config_keys = list(table_params(spec))   # what the table shows of a config
        self._touched: set | None = None       # None: every trial (the first step)

    def __getstate__(self):
        return {**self.__dict__, "_touched": None}   # Tune pickles its callbacks with the Tuner

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self._trim(result)             # in place: Tune's last_result is this dict
        self._touch(trial)

    def on_checkpoint(self, iteration, trials, trial, checkpoint, **info):
        self._touch(trial)

    def on_trial_start(self, iteration, trials, trial, **info):
        self._touch(trial)             # a status change: Tune's cached JSON is written again

    on_trial_restore = on_trial_complete = on_trial_error = on_trial_recover = on_trial_start

    def _touch(self, trial) -> None:
        if self._touched is not None:
            self._touched.add(trial)

    def on_step_end(self, iteration, trials, **info):
        touched, self._touched = (trials if self._touched is None else self._touched), set()
        for trial in touched:
            meta = getattr(trial, "run_metadata", None)
            if meta is None:
                continue
            if meta.metric_analysis:
                meta.metric_analysis, meta.metric_n_steps = {}, {}
            # the kept (marker) checkpoint's copy of its result
            for kept in getattr(meta.checkpoint_manager, "_checkpoint_results", ()):
                if self._trim(kept.metrics):
                    meta.invalidate_cache()
            if hasattr(trial, "_state_json") and hasattr(meta, "_cached_json"):
                state_json, meta_json = trial.get_json_state()   # Tune's cached texts
                trial._state_json, meta._cached_json = _compact(state_json), _compact(meta_json)

    def _trim(self, result: dict) -> bool:
        extra = [k for k in result if k not in self.keep]
        for key in extra:
            del result[key]
        config = result.get("config")
        if isinstance(config, dict):
            shown = _only(config, self.config_keys)
            if shown != config:
                result["config"] = shown
                return True
        return bool(extra)


def _compact(text: str) -> str:
    return json.dumps(json.loads(text), separators=(",", ":"))


def _only(config: dict, keys: list[str]) -> dict:
    """The entries of a nested ``config`` that the "/"-joined ``keys`` name."""
    out: dict = {}
    for key in keys:
        *path, leaf = key.split("/")
        source, target = config, out
        for part in path:
            source = source.get(part) if isinstance(source, dict) else None
            target = target.setdefault(part, {})
        if isinstance(source, dict) and leaf in source:
            target[leaf] = source[leaf]
    return out


def table_params(spec: Spec) -> dict[str, str]:
    """The progress table's config columns (key in Tune's config -> column title)."""
    if spec.search.kind == "grid":
        return {"trial/arm": "arm", "trial/lr": "lr", "trial/batch_size": "bs"}
    # Optuna's lr key depends on the family, and Tune's table needs keys all trials have
    return {"arm": "arm", "batch_size": "bs"}


def reporter(spec: Spec):
    """Progress on the terminal: one row per trial, its arm, lr, batch size and metrics."""
    from ray.tune import CLIReporter

    return CLIReporter(parameter_columns=table_params(spec), max_report_frequency=15,
                       metric_columns={"epoch": "epoch", spec.search.metric: spec.search.metric,
                                       **dict(zip(TABLE_METRICS, ("test_acc", "train_loss")))},
                       sort_by_metric=True, max_progress_rows=12, max_error_rows=5)


def trial_dirname(trial) -> str:
    """``<arm>_<trial id>``; a grid trial's arm from its key (its point is looked up after)."""
    key = trial.config.get(GRID_KEY)
    if isinstance(key, str):
        arm = key.split(":", 1)[1]
    else:
        cfg = trial.config.get("trial", trial.config)
        arm = cfg.get("arm", "trial") if isinstance(cfg, dict) else "trial"
    label = re.sub(r"[^A-Za-z0-9_.=-]+", "_", str(arm))
    return f"{label}_{trial.trial_id}"[:120]
