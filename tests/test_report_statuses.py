"""Reports of studies whose trials did not all finish: every trial lost (errored, interrupted,
killed while running), every trial stopped early by the scheduler, and a mix. Stopped trials
are results with their last epoch's values; interrupted and running ones are not; the report
is written whatever is left, and the parent run's summary says what it could."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pandas as pd
import pytest

from analysis.load import load_mlflow
from analysis.report import make_report
from analysis.summary import BEST_COLUMNS, best_per_family
from study import contract as C

_spec = importlib.util.spec_from_file_location(
    "analysis_store", Path(__file__).with_name("analysis_store.py"))
store = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(store)

TABLES = ("best_lr", "final_test_accuracy", "tuneability", "cost_to_target", "trial_counts",
          "critical_batch_size", "tuning_budget", "baseline_comparison")
FIGURES = ("lr_sensitivity", "lr_bs_heatmaps", "learning_curves", "variance", "grad_histograms",
           "performance_profiles")
DRAWN = FIGURES[:-1]   # the demo store has 2 problems: too few for performance profiles


def all_lost(model, family, lr, batch_size, seed):
    """No result: adam interrupted, svrg left 'running' by a sweep MLflow saw killed (32) or
    failed (128), sgd errored."""
    if family == "adam":
        return C.INTERRUPTED
    if family == "svrg":
        return (C.RUNNING, "KILLED") if batch_size == 32 else (C.RUNNING, "FAILED")
    return C.ERRORED


def all_stopped(model, family, lr, batch_size, seed):
    return C.STOPPED


def mixed(model, family, lr, batch_size, seed):
    """mlp/sgd all stopped after one epoch; cnn/adam at lr 0.03 interrupted (tag left running,
    run killed); one cnn/sgd trial still running; the default diverged and errored trials."""
    if model == "mlp" and family == "sgd":
        return C.STOPPED
    if model == "cnn" and family == "adam" and lr == 0.03:
        return (C.RUNNING, "KILLED")
    if model == "cnn" and family == "sgd" and lr == 0.01 and batch_size == 128:
        return (C.RUNNING, "RUNNING")
    return store.default_outcome(model, family, lr, batch_size, seed)


def _report(tmp_path_factory, outcome):
    root = tmp_path_factory.mktemp(outcome.__name__)
    uri = store.build_store(root, outcome=outcome)
    out = make_report(store.STUDY, tracking_uri=uri, out_dir=root / "report")
    trials, metrics = load_mlflow(store.STUDY, uri)
    return uri, out, trials, metrics


@pytest.fixture(scope="module")
def lost(tmp_path_factory):
    return _report(tmp_path_factory, all_lost)


@pytest.fixture(scope="module")
def stopped(tmp_path_factory):
    return _report(tmp_path_factory, all_stopped)


def _parent(uri, trials):
    from mlflow import MlflowClient

    return MlflowClient(uri).get_run(trials.attrs["parent_run_id"])


def _counts(out) -> pd.DataFrame:
    counts = pd.read_csv(out / "tables" / "trial_counts.csv")
    assert list(counts.columns) == ["family", *C.STATUSES, "total"]
    return counts.set_index("family")


def _figures(out) -> list[str]:
    return sorted(p.stem for p in (out / "figures").glob("*.png"))


def test_a_study_with_no_result_left_still_gets_its_report(lost):
    uri, out, trials, _ = lost
    for name in ("index.md", "index.html", "summary.csv", "best.csv"):
        assert (out / name).is_file(), name
    for table in TABLES:
        assert (out / "tables" / f"{table}.csv").is_file(), table
    counts = _counts(out)
    per_model = len(store.MODELS)
    assert counts.loc["adam", C.INTERRUPTED] == counts.loc["adam", "total"] == 12 * per_model
    assert counts.loc["svrg", [C.INTERRUPTED, C.ERRORED]].tolist() == [4 * per_model] * 2
    assert counts.loc["sgd", C.ERRORED] == counts.loc["sgd", "total"]
    assert counts[[C.FINISHED, C.STOPPED, C.DIVERGED, C.RUNNING]].sum().sum() == 0
    final = pd.read_csv(out / "tables" / "final_test_accuracy.csv")
    assert list(final.columns) == ["note"] and "no trial is a result" in final["note"][0]
    assert best_per_family(out).empty and tuple(best_per_family(out).columns) == BEST_COLUMNS
    assert _figures(out) == []
    md = (out / "index.md").read_text()
    assert md.count("Not drawn:") == len(FIGURES)
    parent = _parent(uri, trials)
    assert not [k for k in parent.data.metrics if k.startswith(C.BEST_PREFIX)]
    note = parent.data.tags[C.TAG_NOTE]
    assert f"{len(trials)} trials: 24 errored, 32 interrupted" in note
    assert "No trial is a result" in note


def test_a_study_whose_every_trial_was_stopped_early_reports_their_last_values(stopped):
    uri, out, trials, metrics = stopped
    counts = _counts(out)
    assert (counts[C.STOPPED] == counts["total"]).all()
    assert _figures(out) == sorted(DRAWN)
    best = best_per_family(out)
    assert len(best) == len(store.MODELS) * len(store.FAMILIES)
    assert (best.loc[best["family"] == "sgd", "lr"] == 0.1).all()
    assert (best.loc[best["family"] == "adam", "lr"] == 0.003).all()
    metrics_on_parent = _parent(uri, trials).data.metrics
    history = metrics[metrics["key"] == "val_accuracy"].sort_values("step")
    last = history.groupby("run_id")["value"].last()
    assert history.groupby("run_id")["step"].nunique().max() == 1  # one epoch each
    for row in best.itertuples():
        runs = trials[(trials["model"] == row.model) & (trials["family"] == row.family)
                      & (trials["lr"] == row.lr) & (trials["batch_size"] == row.batch_size)]
        expected = last[runs["run_id"]].mean()
        percent = pytest.approx(100 * expected, abs=0.05)   # one decimal
        assert best.at[row.Index, "val_accuracy (%)"] == percent
        key = f"{C.BEST_PREFIX}{row.model}/{row.family}/val_accuracy_pct"
        assert metrics_on_parent[key] == percent
    final = pd.read_csv(out / "tables" / "final_test_accuracy.csv")
    assert sorted(set(final["family"])) == ["adam", "sgd", "svrg"]
    assert len(final) == len(store.MODELS) * len(store.FAMILIES)


def test_stopped_trials_are_results_interrupted_and_running_ones_are_not(tmp_path_factory):
    uri, out, trials, _ = _report(tmp_path_factory, mixed)
    def statuses(**match) -> set[str]:
        rows = trials
        for key, value in match.items():
            rows = rows[rows[key] == value]
        return set(rows["status"])

    assert statuses(model="cnn", family="adam", lr=0.03) == {C.INTERRUPTED}  # killed 'running'
    assert statuses(model="cnn", family="sgd", lr=0.01, batch_size=128) == {C.RUNNING}
    assert statuses(model="mlp", family="sgd") == {C.STOPPED}
    counts = _counts(out)
    assert counts.loc["sgd", [C.FINISHED, C.STOPPED, C.DIVERGED, C.RUNNING]].tolist() == [
        6, 8, 1, 1]
    assert counts.loc["adam", C.INTERRUPTED] == 4
    best = best_per_family(out).set_index(["model", "family"])
    assert best.loc[("mlp", "sgd"), "lr"] == 0.1  # chosen among stopped trials
    assert best.loc[("cnn", "adam"), "lr"] == 0.003
    cnn_sgd = trials[(trials["model"] == "cnn") & (trials["family"] == "sgd")]
    row = best.loc[("cnn", "sgd")]
    chosen = cnn_sgd[(cnn_sgd["lr"] == row["lr"]) & (cnn_sgd["batch_size"] == row["batch_size"])]
    assert set(chosen["status"]) == {C.FINISHED}
    best_lr = pd.read_csv(out / "tables" / "best_lr.csv")
    at_128 = best_lr[(best_lr["model"] == "cnn") & (best_lr["family"] == "sgd")
                     & (best_lr["batch_size"] == 128)]
    assert at_128["n_lr"].tolist() == [2]  # the running trial's LR is not in the grid
    note = _parent(uri, trials).data.tags[C.TAG_NOTE]
    assert "8 stopped" in note and "4 interrupted" in note and "1 running" in note


def test_the_report_selects_as_the_logged_spec_says_at_an_epoch(tmp_path):
    """A sweep whose spec selects by train_loss after 2 epochs (sngrad): the report reads that
    from the parent run's spec and each tuned LR is the lowest epoch-2 loss of its grid."""
    spec = "search: {metric: train_loss, mode: min, select: {metric: train_loss, epoch: 2}}\n"
    uri = store.build_store(tmp_path, with_hist=False, spec_text=spec)
    out = make_report(store.STUDY, tracking_uri=uri, out_dir=tmp_path / "report")
    assert "Best LR selected by `min train_loss at epoch 2`" in (out / "index.md").read_text()
    best_lr = pd.read_csv(out / "tables" / "best_lr.csv")
    assert "min train_loss at epoch 2" in (out / "tables" / "best_lr.md").read_text()
    trials, metrics = load_mlflow(store.STUDY, uri)
    epochs = metrics[(metrics["key"] == C.EPOCH) & (metrics["value"] == 2)]
    loss = metrics[metrics["key"] == C.TRAIN_LOSS].merge(epochs[["run_id", "step"]])
    at_two = trials.merge(loss[["run_id", "value"]], on="run_id")
    unfinished = {tuple(k) for k in trials.loc[trials["status"] != C.FINISHED,
                                                ["model", "family", "batch_size"]].to_numpy()}
    checked = 0
    for keys, part in at_two.groupby(["model", "family", "batch_size"]):
        if keys in unfinished:
            continue   # a grid with a diverged or errored trial: checked by other tests
        means = part.groupby("lr")["value"].mean()
        row = best_lr[(best_lr["model"] == keys[0]) & (best_lr["family"] == keys[1])
                      & (best_lr["batch_size"] == keys[2])]
        assert row["best_lr"].iloc[0] == means.idxmin(), keys
        checked += 1
    assert checked >= 8
