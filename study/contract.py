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
EPOCH = "epoch"                       # epochs finished
ITERATION = "iteration"               # steps taken (the MLflow step of every metric)
GRAD_EVALS = "grad_evals"             # examples through a backward, scheduled work included
TIME_S = "time_s"                     # training seconds
MEASURE_S = "measure_s"               # variance-probe seconds
SHADOW_GRAD_EVALS = "shadow_grad_evals"  # the shadow estimators' scheduled work (not training)
LR = "lr"
DIVERGED_FLAG = "diverged"            # the metric: 1 once the trial diverged
REACHED_TARGET = "reached_target"     # 1 once the spec's stop target is met (the trial is done)
TRAIN_BATCH_LOSS = "train_batch_loss"  # mean of the epoch's mini-batch losses
TRAIN_LOSS, TRAIN_ACCURACY = "train_loss", "train_accuracy"
VAL_LOSS, VAL_ACCURACY = "val_loss", "val_accuracy"
TEST_LOSS, TEST_ACCURACY = "test_loss", "test_accuracy"
SPLIT_METRICS = {"train": (TRAIN_LOSS, TRAIN_ACCURACY), "val": (VAL_LOSS, VAL_ACCURACY),
                 "test": (TEST_LOSS, TEST_ACCURACY)}          # split -> (loss, accuracy)
EPOCH_METRICS = (EPOCH, ITERATION, GRAD_EVALS, TIME_S, MEASURE_S, SHADOW_GRAD_EVALS, LR,
                 DIVERGED_FLAG, REACHED_TARGET, TRAIN_BATCH_LOSS, TRAIN_LOSS, TRAIN_ACCURACY,
                 VAL_LOSS, VAL_ACCURACY, TEST_LOSS, TEST_ACCURACY)
VALIDATION_METRICS = (VAL_LOSS, VAL_ACCURACY)  # only with dataset.val_fraction > 0
# metrics that can pick a tuned setting, and which end is best (test_accuracy: only as the
# analysis' fallback for a study without a validation split; a spec cannot ask for it)
SELECTION_MODES = {VAL_ACCURACY: "max", VAL_LOSS: "min", TRAIN_LOSS: "min",
                   TRAIN_ACCURACY: "max", TEST_ACCURACY: "max"}
SELECT_AT = "@"                       # 'train_loss@2': the metric at epoch 2 (search.select)
BEST_PREFIX = "best/"                 # the parent run's summary: best/<model>/<family>/<metric>_pct


def selection_key(metric: str, epoch: int | None = None) -> str:
    """The name of a selection: the final ``metric``, or ``metric@epoch`` at an epoch."""
    return metric if epoch is None else f"{metric}{SELECT_AT}{epoch}"


def parse_selection(key: str) -> tuple[str, int | None]:
    """``selection_key``'s inverse: 'train_loss@2' -> ('train_loss', 2)."""
    metric, at, epoch = key.partition(SELECT_AT)
    return (metric, int(epoch)) if at else (metric, None)
RUN_ID_KEY = "mlflow_run_id"          # reported to Tune beside the metrics (the driver needs it)
# seconds a trial spent besides training and measuring, by phase, logged once at its end:
# overhead/{startup,data,eval,checkpoint,report,log}_s (study.trial.Phases)
OVERHEAD_PREFIX = "overhead/"

# -- the variance probe's metrics (Faghri et al.'s get_Ege_var; McCandlish et al.'s B_simple) --
VARIANCE_PREFIX = "var/"
VARIANCE_STATISTICS = ("var", "nvar", "logsnr", "gnorm")
DIRECTION, SGD_GRADIENT = "dir", "sgd"  # the family's step direction; the plain gradient
VAR_BIAS = "var/bias"                 # mean |E[direction] − E[gradient]|
NOISE_SCALE = "var/noise_scale"       # B_simple = tr(Σ) / |G|² of one measurement
TRACE_SIGMA = "var/trace_sigma"
GRAD_SQ_NORM = "var/grad_sq_norm"     # |G|² as used in the ratio (clamped)
GRAD_SQ_UNBIASED = "var/grad_sq_unbiased"  # the unclamped unbiased |G|² (for pooling)
GRAD_LOG10_SPAN = "grad_log10_span"   # decades |gradient entries| span (1%-99%), per histogram
NOISE_EXAMPLES = "var/noise_examples"  # examples one measurement averaged


def variance_key(estimator: str, statistic: str) -> str:
    """``var/<estimator>_<statistic>``, e.g. var/dir_nvar."""
    return f"{VARIANCE_PREFIX}{estimator}_{statistic}"


# -- artifacts ----------------------------------------------------------------------------------
GRAD_HIST = "grad_hist.json"          # a trial's gradient-magnitude histograms
SPEC_ARTIFACT = "spec.yaml"           # the study spec, on the parent run
GRID_ARTIFACT = "grid.json"           # the resolved trial list (grid search), on the parent run
REPORT_DIR = "report"                 # the report folder, on the parent run

# -- claims: a spec's ``claims:`` names a statistic the analysis computes from the runs --------
# (analysis/claim_stats.py: one function per name). name -> (required, optional) parameters.
CLAIM_STATISTICS = {
    "best_test_accuracy": (("family",), ("model", "dataset")),
    "accuracy_difference": (("family",), ("baseline", "model", "dataset")),
    "variance_ratio_late_early": (("estimator", "family"), ("model", "dataset")),
    "fraction_of_training_between": (("lower", "upper", "value", "family"), ("model", "dataset")),
    "rank_correlation": (("x", "y"), ("family", "model", "dataset")),
    "speed_prediction_advantage": (("better", "worse", "target", "family"), ("model", "dataset")),
    "critical_batch_over_noise_scale": (("target", "family"), ("model", "dataset")),
    "noise_scale_growth": (("target", "family"), ("model", "dataset")),
    "largest_logged": (("key", "family"), ("model", "dataset")),
    "generalization_gap_difference": (("family",), ("baseline", "model", "dataset")),
}
CLAIM_COMPARES = (">", "<", ">=", "<=", "within")
HOLDS, DOES_NOT_HOLD, INCONCLUSIVE = "holds", "does not hold", "inconclusive"
CLAIMS_ARTIFACT = "claims.csv"        # in the report folder (report/claims.csv on the parent)
# the report's figures, by name (a claim's optional ``figure``)
REPORT_FIGURES = ("lr_sensitivity", "lr_bs_heatmaps", "learning_curves", "variance",
                  "grad_histograms", "performance_profiles", "estimators",
                  "critical_batch_front")


def claim_metric(name: str, what: str) -> str:
    """``claim/<name>/<what>``: value, ci_low, ci_high (metrics), verdict (a tag)."""
    return f"claim/{name}/{what}"


# -- the Optuna search space's learning-rate parameter (one per family) --------------------------


def optuna_lr_key(family: str) -> str:
    return f"lr[{family}]"


def parse_optuna_lr_key(key: str) -> str | None:
    """The family of an Optuna lr key, or None when ``key`` is not one."""
    if key.startswith("lr[") and key.endswith("]"):
        return key[3:-1]
    return None
