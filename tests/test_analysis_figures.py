"""Figures drawn from a real (small) MLflow store laid out as the sweep contract says."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from analysis import figures, tables
from analysis.load import StudyNotFoundError, download_grad_hist, load_mlflow
from study import contract as C

_spec = importlib.util.spec_from_file_location(
    "analysis_store", Path(__file__).with_name("analysis_store.py"))
store = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(store)

N_PROBLEMS, N_FAMILIES, N_BATCH, N_LR = len(store.MODELS), len(store.FAMILIES), 2, 3


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow")
    uri = store.build_store(root)
    trials, metrics = load_mlflow(store.STUDY, uri)
    return uri, trials, metrics, tables.best_settings(trials)


def _check_png(result: figures.FigureResult):
    assert result.path is not None, result.reason
    assert result.path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(result.path) as image:
        width, height = image.size
        assert width > 300 and height > 200
        grey_levels = sum(1 for count in image.convert("L").histogram() if count)
        assert grey_levels > 10  # not a blank canvas


def test_loader_reads_every_child_run_of_the_latest_sweep(study):
    _, trials, metrics, _ = study
    assert len(trials) == 56
    assert trials["status"].value_counts().to_dict() == {C.FINISHED: 52, C.DIVERGED: 2,
                                                         C.ERRORED: 2}
    assert set(trials["family"]) == set(store.FAMILIES)
    assert trials["lr"].dtype.kind == "f" and str(trials["batch_size"].dtype) == "Int64"
    one = trials[trials["status"] == C.FINISHED].iloc[0]["run_id"]
    acc = metrics[(metrics["run_id"] == one) & (metrics["key"] == "test_accuracy")]
    assert len(acc) == store.EPOCHS
    final = trials.set_index("run_id").loc[one, "test_accuracy"]
    assert acc.sort_values("step")["value"].iloc[-1] == pytest.approx(final)


def test_loader_defaults_to_the_latest_parent_and_accepts_an_explicit_one(study):
    from mlflow import MlflowClient

    uri = study[0]
    client = MlflowClient(uri)
    exp = client.create_experiment("two_sweeps")
    parents = []
    for n_children in (2, 1):
        parent = client.create_run(exp, tags={C.TAG_KIND: C.KIND_STUDY})
        for _ in range(n_children):
            child = client.create_run(exp, tags={C.TAG_PARENT: parent.info.run_id,
                                                 "family": "sgd", C.TAG_STATUS: C.FINISHED})
            client.log_param(child.info.run_id, "lr", "0.1")
        parents.append(parent.info.run_id)
    client.log_param(parents[1], "dataset", "mnist1d")  # study-wide: on the parent only
    latest, _ = load_mlflow("two_sweeps", uri)
    assert len(latest) == 1 and latest.attrs["parent_run_id"] == parents[1]
    assert latest["dataset"].tolist() == ["mnist1d"]
    first, _ = load_mlflow("two_sweeps", uri, parent_run_id=parents[0])
    assert len(first) == 2
    with pytest.raises(StudyNotFoundError, match="no MLflow experiment"):
        load_mlflow("no_such_study", uri)


def test_lr_sensitivity_panel_per_problem_and_batch_size_with_diverged_marks(study, tmp_path):
    result = figures.lr_sensitivity(study[1], tmp_path)
    _check_png(result)
    assert result.n_panels == N_PROBLEMS * N_BATCH
    assert result.n_series == N_PROBLEMS * N_BATCH * N_FAMILIES
    assert result.n_marked == 2


def test_heatmap_cells_cover_the_grid(study, tmp_path):
    result = figures.lr_bs_heatmaps(study[1], tmp_path)
    _check_png(result)
    assert result.n_panels == N_PROBLEMS * N_FAMILIES
    assert result.n_cells == N_PROBLEMS * N_FAMILIES * N_LR * N_BATCH


def test_learning_and_variance_curves_one_line_per_family_and_quantity(study, tmp_path):
    _, _, metrics, best = study
    # learning: accuracy and loss per gradient evaluation, accuracy per second; variance:
    # var and nvar of the direction, each beside plain SGD's at the same weights
    for draw, per_family in ((figures.learning_curves, 3), (figures.variance_curves, 4)):
        result = draw(metrics, best, tmp_path)
        _check_png(result)
        assert result.n_series == N_PROBLEMS * N_FAMILIES * per_family
    no_var = metrics[~metrics["key"].str.startswith("var/")]
    skipped = figures.variance_curves(no_var, best, tmp_path / "novar")
    assert skipped.path is None and "var/dir_var" in skipped.reason
    assert not (tmp_path / "novar").exists()


def test_grad_histograms_from_downloaded_artifacts(study, tmp_path):
    uri, _, _, best = study
    hists = {}
    for _, row in best.iterrows():
        for run_id in row["run_ids"]:
            hist = download_grad_hist(uri, run_id, tmp_path / "dl" / run_id)
            if hist:
                hists[(row["dataset"], row["model"], row["family"])] = hist
                break
    assert len(hists) == N_PROBLEMS * N_FAMILIES
    result = figures.grad_histograms(hists, tmp_path)
    _check_png(result)
    assert result.n_panels == N_PROBLEMS * N_FAMILIES
    assert result.n_series == N_PROBLEMS * N_FAMILIES * 3  # three logged iterations each
    assert figures.grad_histograms({}, tmp_path / "none").path is None


def _costs_on(n_problems: int, families=("sgd", "adam")) -> pd.DataFrame:
    rows = [{"dataset": "d", "model": f"m{p}", "family": f, "grad_evals_to_target": 100.0 * (i + 1),
             "time_s_to_target": 1.0 + p + i} for p in range(n_problems)
            for i, f in enumerate(families)]
    return pd.DataFrame(rows)


def test_performance_profiles_are_drawn_only_over_enough_problems(study, tmp_path):
    few = figures.MIN_PROFILE_PROBLEMS - 1
    skipped = figures.performance_profiles(_costs_on(few), tmp_path / "few")
    assert skipped.path is None and not (tmp_path / "few").exists()
    assert f"at least {figures.MIN_PROFILE_PROBLEMS} problems" in skipped.reason
    assert f"this study has {few}" in skipped.reason
    drawn = figures.performance_profiles(_costs_on(figures.MIN_PROFILE_PROBLEMS), tmp_path)
    _check_png(drawn)
    assert drawn.n_series == 2 * 2  # grad evals and seconds, two families each
    _, trials, metrics, _ = study   # the demo store: 2 problems, so not drawn
    cost = tables.cost_to_target_frame(trials, metrics)
    assert "this study has 2" in figures.performance_profiles(cost, tmp_path / "demo").reason


def test_profile_curve_matches_hand_computed_ratios():
    import numpy as np
    import pandas as pd

    costs = pd.DataFrame({"a": [100.0, 300.0, np.inf], "b": [200.0, 100.0, np.inf]})
    rho = figures.profile_curve(costs, np.array([1.0, 2.0, 3.0, 4.0]))
    assert rho["a"].tolist() == pytest.approx([1 / 3, 1 / 3, 2 / 3, 2 / 3])
    assert rho["b"].tolist() == pytest.approx([1 / 3, 2 / 3, 2 / 3, 2 / 3])


def test_family_colours_are_fixed_and_distinct():
    colours = [figures.family_color(f) for f in
               ("sgd", "adam", "snr", "well_tempered", "kfac", "svrg", "gc")]
    assert len(set(colours)) == 7
    assert figures.family_color("new_family") == figures.family_color("new_family")


def _keep_figures(monkeypatch) -> list:
    """The figures the next drawing functions save (closed, but their artists stay)."""
    kept, save = [], figures.save_png
    monkeypatch.setattr(figures, "save_png", lambda fig, *a: kept.append(fig) or save(fig, *a))
    return kept


def _lines(fig):
    return [line for ax in fig.axes for line in ax.get_lines()]


def _two_sgd_variants(frame: pd.DataFrame) -> pd.DataFrame:
    """A copy of every sgd row as a second variant (momentum) of the same family."""
    twin = frame[frame["family"] == "sgd"].copy()
    twin["variant"] = "momentum"
    twin["arm"] = twin["arm"].str.replace("/default", "/momentum")
    if "run_id" in twin:
        twin["run_id"] = twin["run_id"] + "-m"
    return pd.concat([frame, twin], ignore_index=True)


def test_curve_figures_tell_variants_apart_by_line_style_and_mark_diverged_points(
        study, tmp_path, monkeypatch):
    _, trials, metrics, best = study
    sgd = figures.family_color("sgd")
    best = _two_sgd_variants(best)
    best.loc[best["family"] == "svrg", "score"] = float("nan")  # as if every LR diverged
    kept = _keep_figures(monkeypatch)
    learning = figures.learning_curves(metrics, best, tmp_path)
    variance = figures.variance_curves(metrics, best, tmp_path)
    doubled = _two_sgd_variants(trials)
    sensitivity = figures.lr_sensitivity(doubled, tmp_path)
    for fig, result, per_problem in zip(kept, (learning, variance, sensitivity), (3, 2, None)):
        lines = _lines(fig)
        styles = {line.get_linestyle() for line in lines
                  if line.get_color() == sgd and line.get_marker() != "x"}
        assert {"-", "--"} <= styles   # one family, two variants: two line styles
        marks = [line for line in lines if line.get_marker() == "x"]
        assert all(line.get_linestyle() == "None" for line in marks)
        n_points = sum(len(line.get_xdata()) for line in marks)
        if per_problem:   # svrg's curve ends in an x in every panel it is drawn in
            assert n_points == result.n_marked == N_PROBLEMS * per_problem
            assert {line.get_color() for line in marks} == {figures.family_color("svrg")}
        else:             # an x per diverged trial
            assert n_points == result.n_marked == (doubled["status"] == C.DIVERGED).sum() > 0
