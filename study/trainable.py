"""The Ray Tune function trainable: ``study.trial.run_trial`` wired to Tune, to the trial's
MLflow child run and to its run id in the study's storage (``study.storage.TrialFiles``).

What a trial costs besides training and measuring is kept small and flat: the run is found
again by the id kept in the trial's files (no search over the experiment); metrics are logged
in batches (flushed at checkpoints and at the end, and under ASHA before each Tune result: a
trial ASHA stops in its report keeps what it logged); checkpoints are taken every
``checkpoint.every_s`` seconds, not every epoch, as Tune checkpoints (so Tune's record of a
resumed trial continues where its state does), of which Tune keeps the last
(``CheckpointConfig(num_to_keep=1)``). The state ``run_trial`` hands over at the last epoch
becomes a checkpoint only when that period is over too: a finished trial is not resumed once
Tune's state says so (a kill before that repeats at most the period), and Tune snapshots its
whole experiment state at every checkpoint (``num_to_keep=1``): a checkpoint per trial of
short trials made that O(trials) per trial (bench/scale.py). Tune gets a result (a round
trip through the driver that the trial waits for) at evaluated epochs (results carry the
search metric): with each checkpoint, at the trial's last epoch (what ``TrialOutcomes``
reads), at most one every ``REPORT_EVERY_S`` in between (none before: a trial shorter than
that reports once), and every one under ASHA.
"""
from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from study import contract as C
from study.contract import optuna_lr_key
from study.spec import DatasetSpec, Spec
from study.storage import Storage, TrialFiles
from study.trial import Phases, run_trial

STATE = "state.pt"            # a checkpoint folder's one file
REPORT_EVERY_S = 5.0          # Tune gets at most one result per 5 s between checkpoints


def search_point(config: dict[str, Any], arms: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Tune's config -> one point of the study's search. Grid configs carry the whole point
    under ``trial``; Optuna configs name an arm and its sampled lr / batch size / seed."""
    if "trial" in config:
        return config["trial"]
    arm = arms[config["arm"]]
    return {**arm, "lr": config[optuna_lr_key(arm["family"])], "batch_size": config["batch_size"],
            "seed": config["seed"]}


def trainable(config: dict[str, Any], spec: Spec, arms: dict[str, dict[str, Any]],
              tracking: dict[str, str], storage: dict[str, str]) -> None:
    """One trial, logged to its MLflow child run, its files in ``storage`` ({"root", "study"}
    of ``study.storage.Storage``).

    It writes the run's final status when the trial ends by itself (finished / diverged /
    errored). When Tune ends it (the scheduler stops it, the sweep is interrupted), ``report``
    raises ``SystemExit`` here and the driver writes the status instead."""
    import ray
    from ray import tune

    from study.tracking import client_for

    logging.getLogger("ray.train").setLevel(logging.WARNING)
    client_for(tracking["uri"])    # opens the store once per worker process, before a run starts
    phases = Phases()              # what happens from here on is in the run's wall time
    with phases.timed("startup"):
        cfg = spec.trial_config(search_point(config, arms))
        torch.set_num_threads(cfg.threads)
        device = "cuda" if cfg.gpu > 0 and torch.cuda.is_available() else "cpu"
        trial_id = tune.get_context().get_trial_id()
        files = TrialFiles(Storage(**storage), trial_id)
        node = ray.get_runtime_context().get_node_id()      # this attempt's node
        state, run = _resume(files, tracking, trial_id, cfg, {C.TAG_STUDY: spec.name,
                                                              C.TAG_NODE_ID: node})
    tune_keys = {"arm": cfg.arm, "family": cfg.family, C.RUN_ID_KEY: run.run_id}
    scheduled = spec.scheduler.kind != "none"   # ASHA's rungs are epochs; it may end the trial
    reported = False                                                # in any report
    last_report = saved_at = time.monotonic()

    def report(metrics: dict[str, Any], state: dict[str, Any] | None) -> None:
        nonlocal reported, last_report, saved_at
        histograms = metrics.pop("histograms", None)
        last = (metrics.get(C.EPOCH, 0) >= spec.epochs or metrics.get(C.DIVERGED_FLAG)
                or metrics.get(C.REACHED_TARGET))
        if last and time.monotonic() - saved_at < spec.checkpoint.every_s:
            state = None               # the trial's end, its period not over: no checkpoint
        saved_at = time.monotonic() if state is not None else saved_at
        to_tune = spec.search.metric in metrics and (   # an evaluated epoch, and
            scheduled or last or time.monotonic() - last_report >= REPORT_EVERY_S)
        if state is not None or (to_tune and scheduled):
            with phases.timed("log"):   # what a resumed (or an ASHA-stopped) trial has logged
                run.flush()
        if histograms:                  # the last epoch's metrics go with the run's end
            with phases.timed("log"):
                run.log_json(C.GRAD_HIST, histograms)
        if state is None and to_tune:
            with phases.timed("report"):
                tune.report({**metrics, **tune_keys})
        elif state is not None:
            with tempfile.TemporaryDirectory() as d:
                with phases.timed("checkpoint"):
                    torch.save(state, Path(d) / STATE)
                    checkpoint = tune.Checkpoint.from_directory(d)
                with phases.timed("report"):   # Tune copies the folder into its storage
                    tune.report({**metrics, **tune_keys}, checkpoint=checkpoint)
        if state is not None or to_tune:
            reported, last_report = True, time.monotonic()

    try:
        final = run_trial(cfg, log=run.log, report=report, state=state, device=device,
                          phases=phases)
    except Exception:
        run.end(C.ERRORED)
        raise
    if not reported and spec.search.metric in final:  # resumed from its last epoch's checkpoint
        tune.report({**final, **tune_keys})
    end_run(run, final, phases)


def run_tags(cfg) -> dict[str, str]:
    """What a trial's MLflow run is tagged with besides its study's and node's tags."""
    return {"family": cfg.family, "variant": cfg.variant, "model": cfg.model, "arm": cfg.arm}


def end_run(run, final: dict[str, Any], phases: Phases) -> None:
    """A trial that ended by itself: its phases' seconds at its last step, then the run's end
    with its status (finished or diverged)."""
    run.log({f"{C.OVERHEAD_PREFIX}{name}_s": s for name, s in phases.items()},
            final.get(C.ITERATION, 0))
    run.end(C.DIVERGED if final.get(C.DIVERGED_FLAG) else C.FINISHED)


def _resume(files: TrialFiles, tracking: dict[str, str], trial_id: str, cfg,
            tags: dict[str, str]):
    """(checkpoint state or None, the trial's MLflow run): the run the trial's files name (a
    trial of a sweep stored before trials had files finds it by a search, once), else a new
    one. A checkpoint Tune names but cannot find (a driver killed between pruning the previous
    one and saving its state) starts the trial over, as Tune's record then does."""
    from ray import tune

    from study.tracking import TrialRun, find_trial_run

    state, run_id = None, files.run_id()
    if (checkpoint := tune.get_checkpoint()) is not None:
        try:
            with checkpoint.as_directory() as d:
                state = torch.load(Path(d) / STATE, weights_only=False)
        except FileNotFoundError:
            logging.getLogger(__name__).warning("trial %s: checkpoint %s is gone; starting over",
                                                trial_id, checkpoint.path)
        if run_id is None:
            found = find_trial_run(tracking["uri"], tracking["experiment_id"],
                                   tracking["parent_run_id"], trial_id)
            run_id = found.info.run_id if found else None
    run = TrialRun(tracking["uri"], tracking["experiment_id"], tracking["parent_run_id"],
                   trial_id, cfg.params(),
                   tags={**tags, **run_tags(cfg)},
                   dataset=dataset_identity(cfg.dataset), run_id=run_id)
    if run_id is None:
        files.set_run_id(run.run_id)
    return state, run


def dataset_identity(dataset: DatasetSpec) -> dict[str, str]:
    """Name, digest and source of the study's data for MLflow's dataset inputs: the digest is
    of the settings that generate / select it (same settings, same examples; where the files
    are and whether they may be downloaded do not change them)."""
    import hashlib

    # options at their defaults are left out, so the digest stays what it was before they existed
    unset = {k for k in ("test_label_noise", "fresh", "augment") if not getattr(dataset, k)}
    digest = hashlib.sha256(dataset.model_dump_json(exclude=unset | {"root", "download"})
                            .encode()).hexdigest()[:10]
    size = f"-{dataset.size}" if dataset.size else ""
    return {"name": f"{dataset.name}{size}", "digest": digest,
            "source": str(Path(dataset.root).resolve() / dataset.name)}
