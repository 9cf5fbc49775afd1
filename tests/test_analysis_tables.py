"""Result tables on a synthetic study whose answers are known by construction."""
from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pandas as pd
import pytest

from analysis import selection, stats, tables
from analysis.load import load_tune
from analysis.writer import Table, to_latex, to_markdown, write_table
from study import contract as C

NAN = float("nan")


def _trial(run_id, family, lr, seed, val, test, loss, status="finished", batch_size=32):
    return {"run_id": run_id, "dataset": "d", "model": "m", "family": family,
            "variant": "default", "arm": f"m/{family}/default", "batch_size": batch_size,
            "lr": lr, "seed": seed, "val_accuracy": val, "test_accuracy": test,
            "train_loss": loss, "grad_evals": 960.0, "time_s": 3.0, "status": status}


def synthetic_trials() -> pd.DataFrame:
    """sgd: lr 0.1 best by val (mean 0.82); lr 0.01 best by train loss; lr 1.0 has one
    diverged seed whose twin scored 0.95 (must not win). adam: lr 1e-3 best (0.86), 1e-2
    within 1 point (0.852), 1e-4 far; one errored trial at 1e-1 (left out of the grid)."""
    rows = [
        _trial("s1", "sgd", 0.01, 0, 0.70, 0.69, 0.10),
        _trial("s2", "sgd", 0.01, 1, 0.72, 0.71, 0.12),
        _trial("s3", "sgd", 0.1, 0, 0.80, 0.78, 0.30),
        _trial("s4", "sgd", 0.1, 1, 0.84, 0.82, 0.32),
        _trial("s5", "sgd", 1.0, 0, NAN, 0.10, NAN, "diverged"),
        _trial("s6", "sgd", 1.0, 1, 0.95, 0.90, 0.50),
        _trial("a1", "adam", 1e-4, 0, 0.60, 0.60, 0.9),
        _trial("a2", "adam", 1e-4, 1, 0.62, 0.61, 0.9),
        _trial("a3", "adam", 1e-3, 0, 0.85, 0.84, 0.2),
        _trial("a4", "adam", 1e-3, 1, 0.87, 0.88, 0.2),
        _trial("a5", "adam", 1e-2, 0, 0.849, 0.84, 0.3),
        _trial("a6", "adam", 1e-2, 1, 0.855, 0.85, 0.3),
        _trial("a7", "adam", 1e-1, 0, NAN, NAN, NAN, "errored"),
    ]
    return pd.DataFrame(rows)


def synthetic_metrics() -> pd.DataFrame:
    """Histories for the two tuned settings: sgd lr 0.1 (both seeds reach 0.65 at step 20)
    and adam lr 1e-3 (seed 0 reaches 0.65 at step 10, seed 1 never); noise scale for sgd."""
    curves = {"s3": [0.5, 0.7, 0.8], "s4": [0.6, 0.66, 0.82], "a3": [0.7, 0.8, 0.85],
              "a4": [0.5, 0.55, 0.6]}
    rows = []
    for run_id, accs in curves.items():
        for i, acc in enumerate(accs):
            step = 10 * (i + 1)
            rows += [(run_id, "val_accuracy", step, acc),
                     (run_id, "grad_evals", step, 320.0 * (i + 1)),
                     (run_id, "time_s", step, float(i + 1))]
    for run_id, values in {"s3": [10, 20, 30], "s4": [40, 50, 60]}.items():
        rows += [(run_id, "var/noise_scale", 5 * (k + 1), float(v)) for k, v in enumerate(values)]
    return pd.DataFrame(rows, columns=["run_id", "key", "step", "value"])


def _row(frame, **match):
    for key, value in match.items():
        frame = frame[frame[key] == value]
    assert len(frame) == 1, f"expected one row for {match}, got {len(frame)}"
    return frame.iloc[0]


def test_best_lr_by_val_accuracy_skips_a_setting_with_a_diverged_seed():
    table = tables.best_lr_table(synthetic_trials(), "val_accuracy")
    sgd = _row(table.frame, family="sgd")
    assert sgd["best_lr"] == 0.1
    assert sgd["val_accuracy (%)"] == 82.0 and sgd["test_accuracy (%)"] == 80.0  # percent
    assert (sgd["n_seeds"], sgd["n_lr"], sgd["n_diverged"]) == (2, 3, 1)
    adam = _row(table.frame, family="adam")
    assert adam["best_lr"] == 1e-3 and adam["n_lr"] == 3  # the errored LR is not in the grid


def test_best_lr_by_train_loss_takes_the_minimum_like_sngrad():
    table = tables.best_lr_table(synthetic_trials(), "train_loss")
    assert _row(table.frame, family="sgd")["best_lr"] == 0.01
    assert _row(table.frame, family="sgd")["train_loss"] == pytest.approx(0.11)
    assert "min final train_loss" in table.title


def test_best_lr_is_missing_when_every_lr_diverged():
    trials = synthetic_trials()
    trials.loc[trials["family"] == "sgd", "status"] = "diverged"
    sgd = _row(tables.best_lr_table(trials).frame, family="sgd")
    assert math.isnan(sgd["best_lr"]) and sgd["n_diverged"] == 6


def test_selection_falls_back_to_test_accuracy_without_a_val_split_and_rejects_bad_names():
    trials = synthetic_trials().drop(columns=["val_accuracy"])
    assert tables.resolve_select(trials, "val_accuracy") == "test_accuracy"
    assert _row(tables.best_lr_table(trials).frame, family="adam")["best_lr"] == 1e-3
    with pytest.raises(ValueError, match="select='accuracy'"):
        tables.resolve_select(trials, "accuracy")


def test_final_accuracy_mean_and_sample_std_over_seeds():
    long = tables.final_accuracy_long(synthetic_trials(), "val_accuracy")
    sgd = _row(long, family="sgd")
    assert sgd["mean"] == pytest.approx(0.80)
    assert sgd["std"] == pytest.approx(np.std([0.78, 0.82], ddof=1))
    # 95% t-interval with n = 2: t(0.975, df=1) = 12.7062, s/sqrt(2) = 0.02 -> ± 25.4 points
    assert sgd["ci_high"] - sgd["mean"] == pytest.approx(12.7062 * 0.02, rel=1e-4)
    final = tables.final_accuracy_table(synthetic_trials()).frame
    assert list(final.columns) == ["dataset", "model", "family", "variant", "batch_size", "lr",
                                   "edge", tables.FINAL_COLUMN, "n_seeds"]
    assert _row(final, family="sgd")[tables.FINAL_COLUMN] == "80.0 ± 25.4"
    assert _row(final, family="adam")[tables.FINAL_COLUMN] == "86.0 ± 25.4"


@pytest.mark.parametrize("replace", [False, True])
def test_expected_best_of_k_draws_matches_an_exact_enumeration(replace):
    """Every ordered draw of k grid points (with or without replacement) is equally likely:
    the mean of their maxima is the truth; ties and an unsorted grid included."""
    grid = [0.3, 0.9, 0.1, 0.9, 0.5]
    for k in range(1, len(grid) + 1):
        draws = (itertools.product(grid, repeat=k) if replace
                 else itertools.permutations(grid, k))
        truth = np.mean([max(d) for d in draws])
        assert stats.expected_best_of_draws(grid, k, replace) == pytest.approx(truth, abs=1e-12)
    assert stats.expected_best_of_draws(grid, 1) == pytest.approx(np.mean(grid))
    assert stats.expected_best_of_draws(grid, len(grid)) == max(grid)
    with pytest.raises(ValueError, match="6 draws without replacement from 5"):
        stats.expected_best_of_draws(grid, 6)


def test_tuneability_is_the_expected_best_after_k_random_lrs_in_percent():
    frame = tables.tuneability_table(synthetic_trials()).frame
    adam, sgd = _row(frame, family="adam"), _row(frame, family="sgd")
    # adam's seed-mean val accuracy per LR: 61.0, 86.0, 85.2 (%); the errored LR is left out
    assert adam["n_lr"] == 3 and adam["best of 1 (%)"] == pytest.approx(77.4)
    assert adam["best of 2 (%)"] == pytest.approx(round((86 + 85.2 + 86) / 3, 1))
    assert math.isnan(adam["best of 4 (%)"]) and adam["best of grid (%)"] == 86.0
    assert adam["mean over budgets (%)"] == pytest.approx(round((77.4 + 257.2 / 3 + 86) / 3, 1))
    # sgd: 71.0, 82.0 and the LR where a seed diverged, which scores 0
    assert sgd["n_lr_diverged"] == 1 and sgd["best of 1 (%)"] == pytest.approx(51.0)
    table = tables.tuneability_table(synthetic_trials())
    assert "Sivaprasad et al. 2020" in table.title


def test_cost_to_target_first_step_median_over_seeds_and_not_reached():
    frame = tables.cost_to_target_frame(synthetic_trials(), synthetic_metrics(), target=0.65)
    sgd, adam = _row(frame, family="sgd"), _row(frame, family="adam")
    assert sgd["grad_evals_to_target"] == 640.0 and sgd["time_s_to_target"] == 2.0
    assert sgd["reached"] == "2/2"
    assert adam["reached"] == "1/2" and math.isinf(adam["grad_evals_to_target"])
    assert adam["fastest_grad_evals_in_grid"] == 320.0
    md = to_markdown(tables.cost_to_target_table(
        synthetic_trials(), synthetic_metrics(), target=0.65).frame)
    assert "not reached" in md


def test_cost_to_target_is_never_set_on_test_data():
    with pytest.raises(ValueError, match="never on test data"):
        tables.cost_to_target_frame(synthetic_trials(), synthetic_metrics(),
                                    metric="test_accuracy")
    no_val = synthetic_metrics().replace({"key": {"val_accuracy": "test_accuracy"}})
    table = tables.cost_to_target_table(synthetic_trials(), no_val)
    assert list(table.frame.columns) == ["note"] and "never on test data" in table.note


def test_cost_to_target_default_is_a_fraction_of_the_best_accuracy_reached():
    frame = tables.cost_to_target_frame(synthetic_trials(), synthetic_metrics(),
                                        target_fraction=0.8)
    assert frame["target"].iloc[0] == pytest.approx(0.8 * 0.85)  # best logged: 0.85 (a3)
    assert _row(frame, family="sgd")["grad_evals_to_target"] == np.median([640.0, 960.0])


def test_status_counts_per_family_in_the_contract_order():
    trials = synthetic_trials()
    trials.loc[trials["run_id"] == "a1", "status"] = C.STOPPED
    trials.loc[trials["run_id"] == "a2", "status"] = C.INTERRUPTED
    frame = tables.status_counts_table(trials).frame
    assert list(frame.columns) == ["family", *C.STATUSES, "total"]
    frame = frame.set_index("family")
    assert frame.loc["sgd", ["finished", "diverged", "errored", "total"]].tolist() == [5, 1, 0, 6]
    assert frame.loc["adam"].tolist() == [4, 1, 0, 1, 1, 0, 7]


def test_stopped_trials_are_results_interrupted_and_running_ones_are_not():
    trials = synthetic_trials()
    trials.loc[trials["run_id"].isin(["s3", "s4"]), "status"] = C.STOPPED  # their last values
    trials.loc[trials["run_id"] == "a3", "status"] = C.INTERRUPTED
    trials.loc[trials["run_id"] == "a4", "status"] = C.RUNNING
    best = tables.best_lr_table(trials).frame
    sgd, adam = _row(best, family="sgd"), _row(best, family="adam")
    assert sgd["best_lr"] == 0.1 and sgd["val_accuracy (%)"] == 82.0
    assert adam["best_lr"] == 1e-2 and adam["n_lr"] == 2  # lr 1e-3 has no result left
    counts = tables.status_counts_table(trials).frame.set_index("family")
    assert counts.loc["adam", [C.INTERRUPTED, C.RUNNING]].tolist() == [1, 1]


@pytest.mark.parametrize("status", [C.ERRORED, C.INTERRUPTED, C.RUNNING, C.STOPPED])
def test_every_table_survives_a_study_whose_every_trial_has_one_status(status):
    trials = synthetic_trials().assign(status=status)
    if status == C.ERRORED:  # an errored trial logged nothing
        trials = trials.drop(columns=["val_accuracy", "test_accuracy", "train_loss"])
    result = tables.all_tables(trials, synthetic_metrics())
    assert [t.name for t in result] == ["best_lr", "final_test_accuracy", "tuneability",
                                         "cost_to_target", "trial_counts", "critical_batch_size"]
    counts = result[4].frame.set_index("family")
    assert (counts[status] == counts["total"]).all() and counts["total"].sum() == len(trials)
    final = result[1].frame
    if status == C.STOPPED:  # results: the same answers as finished trials
        assert _row(final, family="sgd")[tables.FINAL_COLUMN] == "80.0 ± 25.4"
        assert _row(result[0].frame, family="adam")["best_lr"] == 1e-3
    else:
        assert list(final.columns) == ["note"]
        assert result[0].frame.empty and list(result[5].frame.columns) == ["note"]


def test_load_tune_tells_stopped_from_interrupted_trials(tmp_path):
    study = tmp_path / "demo"
    for name, epochs, done in (("full", 3, False), ("asha", 1, True), ("cut", 2, False)):
        trial = study / name
        trial.mkdir(parents=True)
        config = {"arm": "mlp/sgd/default", "lr[sgd]": 0.1, "batch_size": 32, "seed": 0}
        (trial / "params.json").write_text(json.dumps(config))
        lines = [{"epoch": e, "iteration": 10 * e, "test_accuracy": 0.5, "diverged": 0,
                  "training_iteration": e, "done": done and e == epochs}
                 for e in range(1, epochs + 1)]
        (trial / "result.json").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    trials, _ = load_tune(study)
    assert trials.set_index("run_id")["status"].to_dict() == {
        "full": C.FINISHED, "asha": C.STOPPED, "cut": C.INTERRUPTED}


def test_critical_batch_size_median_noise_scale_and_missing_metrics():
    table = tables.critical_batch_table(synthetic_trials(), synthetic_metrics())
    sgd = _row(table.frame, family="sgd")
    assert sgd["b_simple_median_tuned"] == 35.0 and sgd["best_batch_size"] == 32
    empty = tables.critical_batch_table(synthetic_trials(), synthetic_metrics().iloc[:0])
    assert list(empty.frame.columns) == ["note"] and "var/noise_scale" in empty.note


def test_writer_writes_csv_markdown_latex(tmp_path):
    frame = pd.DataFrame({"family": ["sgd_x"], "cost": [np.inf], "acc": ["80.00 ± 2.83"]})
    table = write_table(Table("t", "A title", frame, "a note"), tmp_path)
    assert pd.read_csv(table.paths["csv"])["cost"].iloc[0] == np.inf
    assert "| sgd_x | not reached | 80.00 ± 2.83 |" in table.paths["md"].read_text()
    tex = to_latex(frame, caption="A title")
    assert r"sgd\_x & not reached & 80.00 $\pm$ 2.83 \\" in tex and r"\toprule" in tex


def test_load_tune_reads_grid_and_optuna_configs_results_and_error_marker(tmp_path):
    study = tmp_path / "demo"
    for name, lr, diverged, error in (("t1", 0.1, 0, False), ("t2", 1.0, 1, False),
                                      ("t3", 0.01, 0, True)):
        trial = study / name
        trial.mkdir(parents=True)
        config = {"model": "mlp", "model_options": {"width": 8}, "family": "sgd",
                  "variant": "default", "options": {"momentum": 0.9}, "lr": lr,
                  "batch_size": 32, "seed": 0, "arm": "mlp/sgd/default"}
        if name == "t2":  # Optuna: the arm by name, the LR per family
            config = {"arm": "mlp/sgd/default", "lr[sgd]": lr, "batch_size": 32, "seed": 0}
        else:  # grid search: the whole trial under "trial"
            config = {"trial": config}
        (trial / "params.json").write_text(json.dumps(config))
        lines = [{"iteration": 10 * i, "test_accuracy": 0.5 + 0.1 * i, "train_loss": 1.0 / i,
                  "lr": lr / i, "diverged": diverged if i == 2 else 0, "arm": "mlp/sgd/default",
                  "family": "sgd", "training_iteration": i, "trial_id": name,
                  "config": config, "done": i == 2} for i in (1, 2)]
        (trial / "result.json").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
        if error:
            (trial / "error.txt").write_text("boom")
    trials, metrics = load_tune(study)
    trials = trials.set_index("run_id")
    assert trials.loc["t1", "status"] == "finished" and trials.loc["t2", "status"] == "diverged"
    assert trials.loc["t3", "status"] == "errored"
    assert trials.loc["t1", "opt.momentum"] == 0.9 and trials.loc["t1", "model.width"] == 8
    assert trials.loc["t1", "test_accuracy"] == pytest.approx(0.7)
    assert trials.loc["t2", ["model", "family", "variant"]].tolist() == ["mlp", "sgd", "default"]
    # the configured LR groups trials; the logged (scheduled) LR is kept beside it
    assert trials["lr"].tolist() == [0.1, 1.0, 0.01]
    assert trials.loc["t2", "lr_final"] == 0.5
    hist = metrics[(metrics["run_id"] == "t1") & (metrics["key"] == "test_accuracy")]
    assert hist["step"].tolist() == [10, 20]
    assert not {"config", "training_iteration", "arm"} & set(metrics["key"])


def test_a_family_whose_every_lr_diverged_has_no_tuned_accuracy():
    trials = synthetic_trials()
    trials.loc[trials["family"] == "sgd", "status"] = "diverged"
    final = tables.final_accuracy_table(trials).frame
    assert _row(final, family="sgd")[tables.FINAL_COLUMN] == "–"
    assert _row(final, family="adam")[tables.FINAL_COLUMN] == "86.0 ± 25.4"


def test_pooled_noise_scale_averages_numerator_and_denominator_before_the_ratio():
    metrics = pd.DataFrame(
        [("r1", "var/trace_sigma", 0, 2.0), ("r1", "var/grad_sq_unbiased", 0, 1.0),
         ("r1", "var/trace_sigma", 5, 4.0), ("r1", "var/grad_sq_unbiased", 5, -0.5),
         ("r2", "var/trace_sigma", 0, 1.0), ("r2", "var/grad_sq_unbiased", 0, -1.0)],
        columns=["run_id", "key", "step", "value"])
    # (2 + 4)/2 over (1 - 0.5)/2: 3 / 0.25 -- the per-measurement ratios would be 2 and "∞"
    assert tables._pooled_noise_scale(metrics, ["r1"]) == pytest.approx(12.0)
    assert tables._pooled_noise_scale(metrics, ["r2"]) == np.inf
    assert np.isnan(tables._pooled_noise_scale(metrics, ["r3"]))


def test_noise_scale_at_the_probe_cap_is_a_bound_not_a_measurement():
    """var/noise_scale cannot exceed var/noise_examples: s3's 30 and s4's 60 sit at that cap
    and leave the median (of 10, 20, 40, 50 = 30, not 35 over all six) and are counted."""
    metrics = synthetic_metrics()
    caps = [(run, "var/noise_examples", 5 * (k + 1), cap) for run, cap in (("s3", 30.0),
                                                                           ("s4", 60.0))
            for k in range(3)]
    metrics = pd.concat([metrics, pd.DataFrame(caps, columns=metrics.columns)])
    sgd = _row(tables.critical_batch_table(synthetic_trials(), metrics).frame, family="sgd")
    assert sgd["b_simple_median_tuned"] == 30.0 and sgd["n_at_cap_tuned"] == 2
    assert sgd["n_measurements"] == 4
    uncapped = _row(tables.critical_batch_table(synthetic_trials(), synthetic_metrics()).frame,
                    family="sgd")
    assert uncapped["b_simple_median_tuned"] == 35.0 and uncapped["n_at_cap_tuned"] == 0


def _loss_histories(curves: dict[str, list[float]], steps_per_epoch: int = 10) -> pd.DataFrame:
    """train_loss and epoch logged at each epoch's last step, as trials log them."""
    rows = []
    for run_id, losses in curves.items():
        for epoch, loss in enumerate(losses, start=1):
            step = epoch * steps_per_epoch
            rows += [(run_id, C.EPOCH, step, float(epoch)), (run_id, C.TRAIN_LOSS, step, loss)]
    return pd.DataFrame(rows, columns=["run_id", "key", "step", "value"])


def test_selection_at_an_epoch_picks_the_lr_sngrad_would_where_the_final_loss_differs():
    """lr 0.01 ends lowest (0.2 vs 0.4) but lr 0.1 leads after 2 epochs (0.8 vs 1.5): sngrad's
    rule (lowest training loss after 2 epochs) picks 0.1, the final loss 0.01. A run stopped
    before epoch 2 has no value there and is never picked."""
    curves = {"s1": [2.0, 1.5, 0.2], "s2": [2.1, 1.4, 0.2], "s3": [1.2, 0.8, 0.4],
              "s4": [1.1, 0.9, 0.4], "s5": [0.3]}
    trials = pd.DataFrame([
        _trial(r, "sgd", lr, seed, 0.5, 0.5, curve[-1], status)
        for (r, curve), (lr, seed, status) in zip(curves.items(), [
            (0.01, 0, "finished"), (0.01, 1, "finished"), (0.1, 0, "finished"),
            (0.1, 1, "finished"), (1.0, 0, C.STOPPED)])])
    metrics = _loss_histories(curves)
    final = tables.best_lr_table(trials, C.TRAIN_LOSS)
    assert _row(final.frame, family="sgd")["best_lr"] == 0.01
    at_two = selection.with_selection_column(trials, metrics, "train_loss@2")
    assert at_two.set_index("run_id")["train_loss@2"].to_dict() == pytest.approx(
        {"s1": 1.5, "s2": 1.4, "s3": 0.8, "s4": 0.9, "s5": NAN}, nan_ok=True)
    table = tables.best_lr_table(at_two, "train_loss@2")
    assert _row(table.frame, family="sgd")["best_lr"] == 0.1
    assert "min train_loss at epoch 2" in table.title
    best = tables.best_settings(at_two, "train_loss@2")
    assert best.iloc[0]["score"] == pytest.approx(0.85)


def test_the_selection_comes_from_the_spec_and_bad_names_are_refused():
    spec = "search: {metric: train_loss, mode: min, select: {metric: train_loss, epoch: 2}}"
    assert selection.of_spec(spec) == "train_loss@2"
    assert selection.of_spec("search: {metric: train_loss, mode: min}") == "train_loss"
    assert selection.of_spec("search: {metric: grad_evals}") == "val_accuracy"
    assert selection.of_spec(None) == "val_accuracy"
    assert selection.describe("val_accuracy") == "max final val_accuracy"
    with pytest.raises(ValueError, match="select='grad_evals@2'"):
        selection.mode("grad_evals@2")
