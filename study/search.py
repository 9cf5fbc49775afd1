"""How a spec becomes a Ray Tune experiment: the search (a grid, or Optuna's define-by-run
space), the scheduler (none, or ASHA), the terminal progress table and trial folder names.

Tune pickles the searcher and the scheduler into its experiment state (that is how a sweep
resumes), so everything here that Tune keeps is a module-level class holding plain data.
"""
from __future__ import annotations

import re
from typing import Any

from study.contract import optuna_lr_key
from study.spec import Spec


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


def searcher(spec: Spec):
    """(search algorithm or None, param_space, num_samples) for ``spec.search``."""
    from ray import tune

    if spec.search.kind == "grid":
        return None, {"trial": tune.grid_search(spec.trials())}, 1
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # one line per trial is Tune's job
    sampler = (optuna.samplers.TPESampler(seed=spec.search.seed) if spec.search.sampler == "tpe"
               else optuna.samplers.RandomSampler(seed=spec.search.seed))
    search = OptunaSearch(space=OptunaSpace(spec), metric=spec.search.metric,
                          mode=spec.search.mode, sampler=sampler)
    return search, {}, spec.search.num_samples


def scheduler(spec: Spec):
    """ASHA over epochs (Tune's training_iteration = epochs reported), or None."""
    if spec.scheduler.kind == "none":
        return None
    from ray.tune.schedulers import ASHAScheduler

    return ASHAScheduler(time_attr="training_iteration", max_t=spec.epochs,
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
            callbacks=callbacks,
            # Keep every (small) epoch checkpoint: pruning forces an experiment snapshot per
            # checkpoint, which throttles short trials.
            checkpoint_config=tune.CheckpointConfig(num_to_keep=None)))


def reporter(spec: Spec):
    """Progress on the terminal: one row per trial, its arm, lr, batch size and metrics."""
    from ray.tune import CLIReporter

    if spec.search.kind == "grid":
        params: dict[str, str] = {"trial/arm": "arm", "trial/lr": "lr",
                                  "trial/batch_size": "bs"}
    else:  # Optuna's lr key depends on the family, and Tune's table needs keys all trials have
        params = {"arm": "arm", "batch_size": "bs"}
    return CLIReporter(parameter_columns=params, max_report_frequency=15,
                       metric_columns={"epoch": "epoch", spec.search.metric: spec.search.metric,
                                       "test_accuracy": "test_acc", "train_loss": "train_loss"},
                       sort_by_metric=True, max_progress_rows=12, max_error_rows=5)


def trial_dirname(trial) -> str:
    cfg: dict[str, Any] = trial.config.get("trial", trial.config)
    label = re.sub(r"[^A-Za-z0-9_.=-]+", "_", str(cfg.get("arm", "trial")))
    return f"{label}_{trial.trial_id}"[:120]
