"""The names the study writes and the analysis reads: metric keys, tags, statuses, artifact
names and the Optuna learning-rate key. Both sides import them from here (this module
imports nothing heavy, so ``analysis`` can use it without torch or Ray).
"""
from __future__ import annotations

# -- trial statuses (the ``status`` tag of a child run) and their MLflow run status -------------
RUNNING = "running"          # the trial is training (or was, when the store was read)
FINISHED = "finished"        # trained every epoch
STOPPED = "stopped"          # stopped early by the scheduler (ASHA): a result, with fewer epochs
DIVERGED = "diverged"        # the loss turned non-finite or exploded: a result
ERRORED = "errored"          # the trial crashed (after its retries): infrastructure, not science
INTERRUPTED = "interrupted"  # the sweep was interrupted; running the sweep again continues it

STATUSES = (FINISHED, STOPPED, DIVERGED, ERRORED, INTERRUPTED, RUNNING)
RESULT_STATUSES = (FINISHED, STOPPED, DIVERGED)          # trials whose numbers are results
MLFLOW_STATUS = {RUNNING: "RUNNING", FINISHED: "FINISHED", STOPPED: "FINISHED",
                 DIVERGED: "FINISHED", ERRORED: "FAILED", INTERRUPTED: "KILLED"}

# -- tags ---------------------------------------------------------------------------------------
TAG_KIND = "gradstudy.kind"          # "study" on the parent run, "trial" on each child
KIND_STUDY, KIND_TRIAL = "study", "trial"
TAG_STUDY = "gradstudy.study"
TAG_STATUS = "status"
TAG_TRIAL_ID = "trial_id"            # Ray Tune's trial id
TAG_NODE_ID = "node_id"              # the Ray node the trial (last) ran on
TAG_PARENT = "mlflow.parentRunId"
TAG_NOTE = "mlflow.note.content"     # the run description MLflow's UI shows
TRIAL_TAGS = ("family", "variant", "model", "arm")

# -- metrics every trial reports once per epoch (what ``search.metric`` may name) ---------------
EPOCH_METRICS = ("epoch", "iteration", "grad_evals", "time_s", "measure_s", "lr", "diverged",
                 "train_batch_loss", "train_loss", "train_accuracy", "val_loss", "val_accuracy",
                 "test_loss", "test_accuracy")
VALIDATION_METRICS = ("val_loss", "val_accuracy")      # only with dataset.val_fraction > 0
RUN_ID_KEY = "mlflow_run_id"          # reported to Tune beside the metrics (the driver needs it)
VARIANCE_PREFIX = "var/"              # the variance probe's metrics: var/dir_var, var/noise_scale
BEST_PREFIX = "best/"                 # the parent run's summary: best/<model>/<family>/<metric>

# -- artifacts ----------------------------------------------------------------------------------
GRAD_HIST = "grad_hist.json"          # a trial's gradient-magnitude histograms
SPEC_ARTIFACT = "spec.yaml"           # the study spec, on the parent run
GRID_ARTIFACT = "grid.json"           # the resolved trial list (grid search), on the parent run
REPORT_DIR = "report"                 # the report folder, on the parent run

# -- the Optuna search space's learning-rate parameter (one per family) --------------------------


def optuna_lr_key(family: str) -> str:
    return f"lr[{family}]"


def parse_optuna_lr_key(key: str) -> str | None:
    """The family of an Optuna lr key, or None when ``key`` is not one."""
    if key.startswith("lr[") and key.endswith("]"):
        return key[3:-1]
    return None
