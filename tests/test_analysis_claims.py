"""Claims as data, on a contract-shaped MLflow store whose answers are known by construction
(tests/analysis_store.py): a claim that holds, one that does not, one whose interval straddles
its threshold, ones whose data is missing; each statistic against its known truth; the report
opening with the Claims table, claims.csv and the parent run's claim metrics and verdicts."""
from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from scipy import stats as S

from analysis import claims, stats
from analysis.claim_stats import Context, best_test_accuracy
from analysis.load import load_mlflow
from analysis.report import make_report
from study import contract as C

_spec = importlib.util.spec_from_file_location(
    "analysis_store", Path(__file__).with_name("analysis_store.py"))
store = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(store)


def claim(name, statistic, params, compare=">", threshold=0.0, **extra):
    return {"name": name, "source": "a paper, Table 1", "statistic": statistic,
            "params": params, "compare": compare, "threshold": threshold, **extra}


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("claims")
    uri = store.build_store(root, with_hist=False)
    trials, metrics = load_mlflow(store.STUDY, uri)
    return root, uri, trials, metrics


def _tuned_test_acc(trials, model="mlp", family="sgd", lr=0.1, batch_size=32):
    """The store's tuned setting of sgd on the mlp (lr 0.1, batch 32, seeds 0 and 1)."""
    runs = trials[(trials["model"] == model) & (trials["family"] == family)
                  & (trials["lr"] == lr) & (trials["batch_size"] == batch_size)]
    assert len(runs) == 2
    return runs.sort_values("seed")["test_accuracy"].to_numpy()


def test_a_claim_that_holds_one_that_does_not_and_one_that_straddles(study):
    _, _, trials, metrics = study
    acc = 100 * _tuned_test_acc(trials)
    low, high = S.t.interval(0.95, df=1, loc=acc.mean(), scale=S.sem(acc))
    params = {"family": "sgd", "model": "mlp"}
    results = claims.evaluate([claim("above_50", "best_test_accuracy", params, ">", 50),
                               claim("above_90", "best_test_accuracy", params, ">", 90),
                               claim("at_mean", "best_test_accuracy", params, ">=",
                                     float(acc.mean()))], trials, metrics)
    assert [r.verdict for r in results] == [C.HOLDS, C.DOES_NOT_HOLD, C.INCONCLUSIVE]
    for r in results:
        assert r.estimate.value == pytest.approx(acc.mean())
        assert (r.estimate.low, r.estimate.high) == pytest.approx((low, high))
    assert "straddles" in results[2].reason


def test_missing_data_and_unknown_names_are_inconclusive_with_the_reason(study):
    _, _, trials, metrics = study
    results = claims.evaluate([
        claim("no_shadow", "variance_ratio_late_early",
              {"estimator": "sgd_2b_var", "family": "sgd", "model": "mlp"}),
        claim("no_family", "best_test_accuracy", {"family": "kfac", "model": "mlp"}),
        claim("which_model", "best_test_accuracy", {"family": "sgd"}),
        claim("typo", "best_test_acc", {"family": "sgd"}),
    ], trials, metrics)
    assert all(r.verdict == C.INCONCLUSIVE and math.isnan(r.estimate.value) for r in results)
    assert "missing data" in results[0].reason and "var/sgd_2b_var" in results[0].reason
    assert "no result of family 'kfac'" in results[1].reason
    assert "models cnn, mlp: name one in params.model" in results[2].reason
    assert results[3].reason.startswith("invalid claim: unknown statistic 'best_test_acc'")


def test_variance_statistics_against_the_stores_formula(study):
    """The store logs var = c · 10^(0.3·log10(step+1)) at steps 1, 16 and 48 (batch 32):
    late/early = (49/2)^0.3 on every seed; var/sgd_var = var/dir_var <= var/sgd_nvar."""
    _, _, trials, metrics = study
    ctx = Context(trials, metrics)
    ratio = claims.STATISTICS["variance_ratio_late_early"].fn(
        ctx, estimator="dir_var", family="sgd", model="mlp")
    assert ratio.value == pytest.approx((49 / 2) ** 0.3) and ratio.n == 2
    between = claims.STATISTICS["fraction_of_training_between"].fn
    inside = between(ctx, lower="sgd_var", upper="sgd_nvar", value="dir_var", family="sgd",
                     model="mlp")
    outside = between(ctx, lower="sgd_nvar", upper="sgd_nvar", value="dir_var", family="sgd",
                      model="mlp")
    assert (inside.value, outside.value) == (1.0, 0.0)
    (held,) = claims.evaluate([claim("grows", "variance_ratio_late_early",
                                     {"estimator": "dir_var", "family": "sgd", "model": "mlp"},
                                     "within", [2.0, 3.0])], trials, metrics)
    assert held.verdict == C.HOLDS


def test_rank_correlation_is_spearmans_over_the_non_diverged_results(study):
    _, _, trials, metrics = study
    est = claims.STATISTICS["rank_correlation"].fn(
        Context(trials, metrics), x="var/noise_scale", y="test_accuracy", model="cnn")
    runs = trials[(trials["model"] == "cnn") & (trials["status"] == C.FINISHED)]
    ref = S.spearmanr(runs["var/noise_scale"], runs["test_accuracy"])
    assert est.value == pytest.approx(ref.statistic) and est.p == pytest.approx(ref.pvalue)
    assert est.n == len(runs) and est.low < est.value < est.high


def _frame(seeds_a, seeds_b, acc_a, acc_b):
    rows = []
    for family, seeds, accs in (("snr", seeds_a, acc_a), ("sgd", seeds_b, acc_b)):
        for seed, acc in zip(seeds, accs):
            rows.append({"run_id": f"{family}{seed}", "dataset": "d", "model": "m",
                         "family": family, "variant": "default", "arm": f"m/{family}/default",
                         "batch_size": 32, "lr": 0.1, "seed": seed, "val_accuracy": acc,
                         "test_accuracy": acc, "status": "finished"})
    return pd.DataFrame(rows)


def test_accuracy_difference_is_paired_by_seed_else_welch():
    a, b = [0.80, 0.83, 0.79], [0.78, 0.80, 0.78]
    ctx = Context(_frame([0, 1, 2], [0, 1, 2], a, b),
                  pd.DataFrame(columns=["run_id", "key", "step", "value"]))
    diff = claims.STATISTICS["accuracy_difference"].fn
    paired = diff(ctx, family="snr", baseline="sgd")
    ref = S.ttest_rel(a, b)
    ci = ref.confidence_interval()
    assert paired.method == stats.PAIRED and paired.p == pytest.approx(ref.pvalue)
    assert (paired.low, paired.high) == pytest.approx((100 * ci.low, 100 * ci.high))
    ctx = Context(_frame([0, 1, 2], [3, 4, 5], a, b), ctx.metrics)
    welch = diff(ctx, family="snr", baseline="sgd")
    assert welch.method == stats.WELCH
    assert welch.p == pytest.approx(S.ttest_ind(a, b, equal_var=False).pvalue)


def test_one_seed_gives_no_interval_and_so_no_verdict():
    ctx = Context(_frame([0], [0], [0.9], [0.5]), pd.DataFrame(
        columns=["run_id", "key", "step", "value"]))
    est = best_test_accuracy(ctx, family="snr")
    assert est.value == pytest.approx(90.0) and not est.has_ci
    verdict, reason = claims.judge(est, ">", 50)
    assert verdict == C.INCONCLUSIVE and "one seed" in reason


@pytest.mark.parametrize("low, high, compare, threshold, verdict", [
    (1, 2, ">", 0.5, C.HOLDS), (1, 2, ">", 2, C.DOES_NOT_HOLD), (1, 2, ">", 1.5, C.INCONCLUSIVE),
    (1, 2, ">=", 1, C.HOLDS), (1, 2, "<", 3, C.HOLDS), (1, 2, "<", 1, C.DOES_NOT_HOLD),
    (1, 2, "<=", 2, C.HOLDS), (1, 2, "<=", 0.5, C.DOES_NOT_HOLD),
    (1, 2, "within", [0, 3], C.HOLDS), (1, 2, "within", [3, 4], C.DOES_NOT_HOLD),
    (1, 2, "within", [1.5, 4], C.INCONCLUSIVE)])
def test_verdict_of_an_interval_against_each_comparison(low, high, compare, threshold, verdict):
    est = stats.Estimate((low + high) / 2, low, high, 3)
    assert claims.judge(est, compare, threshold)[0] == verdict


def test_the_report_opens_with_the_claims_and_logs_them_on_the_parent(study):
    """The claims of the spec the sweep logged on its parent run: index.md and index.html open
    with the Claims table, claims.csv holds the numbers, the parent has claim/<name>/...."""
    from mlflow import MlflowClient

    root, uri, trials, _ = study
    spec = {"name": store.STUDY, "claims": [
        claim("sgd_learns", "best_test_accuracy", {"family": "sgd", "model": "mlp"}, ">", 50,
              figure="lr_sensitivity"),
        claim("no_shadow", "variance_ratio_late_early",
              {"estimator": "sgd_2b_var", "family": "sgd", "model": "mlp"})]}
    spec_file = root / "spec" / C.SPEC_ARTIFACT
    spec_file.parent.mkdir()
    spec_file.write_text(yaml.safe_dump(spec))
    parent = trials.attrs["parent_run_id"]
    client = MlflowClient(uri)
    client.log_artifact(parent, str(spec_file))
    out = make_report(store.STUDY, tracking_uri=uri, out_dir=root / "report")
    md = (out / "index.md").read_text()
    headings = [line for line in md.splitlines() if line.startswith("## ")]
    assert headings[:2] == ["## Claims", "## Protocol checks"]
    assert "| sgd_learns | a paper, Table 1 |" in md and "lr_sensitivity" in md
    html = (out / "index.html").read_text()
    assert html.index("<h2") == html.index("<h2 id='claims'>Claims</h2>")
    csv = pd.read_csv(out / C.CLAIMS_ARTIFACT).set_index("name")
    assert csv.loc["sgd_learns", "verdict"] == C.HOLDS
    assert csv.loc["no_shadow", "verdict"] == C.INCONCLUSIVE and np.isnan(
        csv.loc["no_shadow", "value"])
    run = client.get_run(parent)
    assert run.data.metrics["claim/sgd_learns/value"] == pytest.approx(
        100 * _tuned_test_acc(trials).mean())
    assert run.data.tags["claim/sgd_learns/verdict"] == C.HOLDS
    assert run.data.tags["claim/no_shadow/verdict"] == C.INCONCLUSIVE
    assert "claim/no_shadow/value" not in run.data.metrics
    logged = {a.path for a in client.list_artifacts(parent, C.REPORT_DIR)}
    assert f"{C.REPORT_DIR}/{C.CLAIMS_ARTIFACT}" in logged


def test_the_printed_claims_table_shows_every_threshold(tmp_path):
    """Numeric thresholds only (a column pandas would read as floats) and a range, from the
    claims.csv the report writes: each shows with its comparison."""
    results = [claims.ClaimResult(
        {"name": name, "statistic": "best_test_accuracy", "compare": compare,
         "threshold": threshold}, stats.Estimate(value, value - 1, value + 1, 3), verdict, "")
        for name, compare, threshold, value, verdict in (
            ("a", ">", 0.5, 2.0, C.HOLDS), ("b", "<", 0, 2.0, C.DOES_NOT_HOLD))]
    for name, rows in (("numbers", results), ("range", [claims.ClaimResult(
            {"name": "c", "compare": "within", "threshold": [66, 70]},
            stats.Estimate(67.0), C.INCONCLUSIVE, "no interval")])):
        folder = tmp_path / name
        folder.mkdir()
        claims.claims_csv(rows, folder / C.CLAIMS_ARTIFACT)
    text = claims.format_claims([tmp_path / n / C.CLAIMS_ARTIFACT for n in ("numbers", "range")])
    assert "> 0.5" in text and "< 0" in text and "within [66, 70]" in text
    assert "2 [1, 3]" in text and "inconclusive (no interval)" in text
