"""The fair-protocol checks and the seed statistics behind them, against known answers:
Welch's t-test on the textbook example (Wikipedia's "Welch's t-test": t = −2.46, ν = 25.0,
p = 0.021) and scipy.stats; grid edges, unequal budgets and a momentum baseline on synthetic
trials built so that the answer is known."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats as S

from analysis import protocol, stats, tables

A1 = [27.5, 21.0, 19.0, 23.6, 17.0, 17.9, 16.9, 20.1, 21.9, 22.6, 23.1, 19.6, 19.0, 21.7, 21.4]
A2 = [27.1, 22.0, 20.8, 23.4, 23.4, 23.5, 25.8, 22.0, 24.8, 20.2, 21.9, 22.1, 22.9, 20.5, 24.4]


def test_welch_on_the_textbook_example():
    est = stats.welch(A1, A2)
    se = math.sqrt(np.var(A1, ddof=1) / 15 + np.var(A2, ddof=1) / 15)
    assert est.value / se == pytest.approx(-2.46, abs=0.005)
    assert est.p == pytest.approx(0.021, abs=0.0005)
    assert est.method == stats.WELCH


@pytest.mark.parametrize("seed", range(5))
def test_welch_matches_scipy_on_unequal_samples(seed):
    rng = np.random.default_rng(seed)
    a, b = rng.normal(0.8, 0.02, size=3 + seed), rng.normal(0.78, 0.05, size=5)
    est, ref = stats.welch(a, b), S.ttest_ind(a, b, equal_var=False)
    ci = ref.confidence_interval(0.95)
    assert est.p == pytest.approx(ref.pvalue, rel=1e-9)
    assert (est.low, est.high) == pytest.approx((ci.low, ci.high), rel=1e-9)
    assert est.value == pytest.approx(a.mean() - b.mean())


def test_welch_with_one_seed_has_no_test_and_says_so():
    est = stats.welch([0.8], [0.7, 0.75])
    assert est.value == pytest.approx(0.075) and math.isnan(est.p) and not est.has_ci
    assert "one seed" in est.note


def test_mean_ci_is_the_t_interval():
    x = [0.78, 0.82, 0.80, 0.85]
    est = stats.mean_ci(x)
    low, high = S.t.interval(0.95, df=3, loc=np.mean(x), scale=S.sem(x))
    assert (est.low, est.high) == pytest.approx((low, high))
    # by hand: t(0.975, 1) = 12.7062 for two seeds
    two = stats.mean_ci([0.78, 0.82])
    assert two.high - two.value == pytest.approx(12.7062 * 0.02, rel=1e-4)
    one = stats.mean_ci([0.7])
    assert one.value == 0.7 and not one.has_ci and stats.fmt(one.scaled(100)) == "70.0 (n=1, no CI)"
    assert stats.fmt(two.scaled(100)) == "80.0 ± 25.4"


def test_paired_and_spearman_match_scipy():
    a, b = [1.0, 2.0, 3.0, 5.0], [0.5, 2.5, 2.0, 3.0]
    assert stats.paired(a, b).p == pytest.approx(S.ttest_rel(a, b).pvalue)
    x, y = [1, 2, 3, 4, 5, 6, 7], [2, 1, 4, 3, 7, 5, 6]
    est, ref = stats.spearman(x, y), S.spearmanr(x, y)
    assert est.value == pytest.approx(ref.statistic) and est.p == pytest.approx(ref.pvalue)
    z, se = math.atanh(ref.statistic), math.sqrt(1.06 / 4)
    assert est.low == pytest.approx(math.tanh(z - 1.959964 * se), rel=1e-5)
    assert est.high == pytest.approx(math.tanh(z + 1.959964 * se), rel=1e-5)


# -- synthetic trials ------------------------------------------------------------------------

def _trials(spec: dict, seeds=(0, 1), momentum=None) -> pd.DataFrame:
    """spec: family -> {lr: val accuracy}; test accuracy = val + seed/100."""
    rows = []
    for family, grid in spec.items():
        variant = "momentum" if momentum and family == "sgd" else "default"
        for lr, acc in grid.items():
            for seed in seeds:
                rows.append({"run_id": f"{family}-{lr}-{seed}", "dataset": "d", "model": "m",
                             "family": family, "variant": variant,
                             "arm": f"m/{family}/{variant}", "batch_size": 32, "lr": lr,
                             "seed": seed, "val_accuracy": acc, "test_accuracy": acc + seed / 100,
                             "train_loss": 1 - acc, "status": "finished",
                             "opt.momentum": momentum if family == "sgd" else np.nan})
    return pd.DataFrame(rows)


def test_edge_flags_low_high_and_inside_in_every_best_table():
    trials = _trials({"sgd": {0.01: 0.9, 0.1: 0.8, 1.0: 0.7},      # best at the lowest LR
                      "adam": {1e-4: 0.6, 1e-3: 0.7, 1e-2: 0.8},   # best at the highest LR
                      "snr": {0.01: 0.7, 0.1: 0.85, 1.0: 0.6}})    # inside
    want = {"sgd": "low", "adam": "high", "snr": ""}
    for frame in (tables.best_lr_table(trials).frame, tables.final_accuracy_table(trials).frame,
                  tables.best_settings(trials)):
        assert frame.set_index("family")["edge"].to_dict() == want
    warnings = protocol.edge_warnings(trials, "val_accuracy")
    assert len(warnings) == 2
    assert any("sgd" in w and "smallest" in w and "downwards" in w for w in warnings)
    assert any("adam" in w and "largest" in w and "upwards" in w for w in warnings)


def test_a_diverged_top_lr_closes_the_grid():
    trials = _trials({"sgd": {0.01: 0.7, 0.1: 0.9, 1.0: 0.1}})
    trials.loc[trials["lr"] == 1.0, "status"] = "diverged"
    assert tables.best_settings(trials)["edge"].tolist() == [""]
    one = _trials({"sgd": {0.1: 0.9}})
    assert tables.best_settings(one)["edge"].tolist() == ["only"]


def test_unequal_budgets_are_stated_and_warned():
    trials = _trials({"sgd": {0.01: 0.7, 0.1: 0.9, 1.0: 0.8}, "adam": {1e-3: 0.8, 1e-2: 0.85}})
    budget = protocol.budget_frame(trials).set_index("family")
    assert budget.loc["sgd", ["n_lr", "n_settings", "n_seeds", "n_trials"]].tolist() == [3, 3, 2, 6]
    assert budget.loc["adam", "n_settings"] == 2
    (warning,) = protocol.budget_warnings(trials)
    assert "Unequal tuning budgets" in warning and "adam 2" in warning and "sgd 3" in warning
    equal = _trials({"sgd": {0.01: 0.7, 0.1: 0.9}, "adam": {1e-3: 0.8, 1e-2: 0.85}})
    assert protocol.budget_warnings(equal) == []


def test_variants_count_in_the_budget():
    trials = _trials({"sgd": {0.01: 0.7, 0.1: 0.9}, "snr": {0.01: 0.7, 0.1: 0.9}})
    extra = trials[trials["family"] == "snr"].assign(variant="II", arm="m/snr/II")
    trials = pd.concat([trials, extra.assign(run_id=extra["run_id"] + "-II")])
    budget = protocol.budget_frame(trials).set_index("family")
    assert budget.loc["snr", ["n_variants", "n_settings"]].tolist() == [2, 4]
    assert "snr 4" in protocol.budget_warnings(trials)[0]


def test_comparison_against_the_baseline_is_welchs_test():
    trials = _trials({"sgd": {0.01: 0.7, 0.1: 0.9, 1.0: 0.8},
                      "adam": {1e-3: 0.8, 1e-2: 0.85, 1e-1: 0.6}}, seeds=(0, 1, 2))
    # give the seeds unequal spreads so the test is not degenerate
    trials.loc[trials["run_id"] == "adam-0.01-2", "test_accuracy"] = 0.80
    frame = protocol.comparison_frame(trials, "val_accuracy").set_index("family")
    adam = trials[(trials["family"] == "adam") & (trials["lr"] == 0.01)]["test_accuracy"]
    sgd = trials[(trials["family"] == "sgd") & (trials["lr"] == 0.1)]["test_accuracy"]
    ref = S.ttest_ind(adam, sgd, equal_var=False)
    assert frame.loc["adam", "p"] == pytest.approx(ref.pvalue)
    assert frame.loc["adam", "diff"] == pytest.approx(100 * (adam.mean() - sgd.mean()))
    want = ("no significant difference" if ref.pvalue >= 0.05 else "significantly "
            + ("higher" if adam.mean() > sgd.mean() else "lower") + " (p < 0.05)")
    assert frame.loc["adam", "result"] == want
    table = protocol.comparison_table(trials, "val_accuracy")
    assert "Welch" in table.title and "Welch p" in table.frame.columns


def test_comparison_tells_a_clear_difference_from_none_and_one_seed():
    far = _trials({"sgd": {0.1: 0.6, 1.0: 0.5}, "adam": {1e-3: 0.9, 1e-2: 0.8}}, seeds=(0, 1, 2))
    far.loc[far["run_id"].str.endswith("-1"), "test_accuracy"] -= 0.015   # unequal spreads
    assert protocol.comparison_frame(far, "val_accuracy").iloc[0]["result"] == (
        "significantly higher (p < 0.05)")
    one = _trials({"sgd": {0.1: 0.6, 1.0: 0.5}, "adam": {1e-3: 0.9, 1e-2: 0.8}}, seeds=(0,))
    assert protocol.comparison_frame(one, "val_accuracy").iloc[0]["result"] == (
        "not tested: one seed")
    assert protocol.seed_warnings(one, "val_accuracy")[0].startswith("One seed")
    assert protocol.seed_warnings(far, "val_accuracy") == []


def test_momentum_baseline_against_families_without_momentum_is_warned():
    spec = {"sgd": {0.01: 0.7, 0.1: 0.9}, "snr": {0.01: 0.7, 0.1: 0.9},
            "adam": {1e-3: 0.8, 1e-2: 0.85}}
    (warning,) = protocol.momentum_warnings(_trials(spec, momentum=0.9))
    assert "momentum 0.9" in warning and "snr" in warning and "adam" not in warning.split(
        "while")[1]
    assert protocol.momentum_warnings(_trials(spec, momentum=0.0)) == []
    assert protocol.momentum_warnings(_trials(spec)) == []
    with_momentum = _trials(spec, momentum=0.9)
    with_momentum.loc[with_momentum["family"] == "snr", "opt.momentum"] = 0.9
    assert protocol.momentum_warnings(with_momentum) == []


def test_trials_with_fewer_than_five_variance_measurements_are_warned():
    trials = _trials({"sgd": {0.1: 0.9}}, seeds=(0, 1))
    rows = [(f"sgd-0.1-{seed}", "var/dir_var", step, 1.0) for seed, steps in ((0, 3), (1, 6))
            for step in range(steps)]
    metrics = pd.DataFrame(rows, columns=["run_id", "key", "step", "value"])
    (warning,) = protocol.measurement_warnings(trials, metrics)
    assert warning.startswith("1 of 2 trials have fewer than 5") and "as few as 3" in warning
    assert protocol.measurement_warnings(trials, metrics[metrics["step"] < 0]) == []
    enough = metrics.assign(run_id="sgd-0.1-1")
    assert protocol.measurement_warnings(trials.iloc[1:], enough) == []
