"""Claims as data: a spec's ``claims:`` says what the study should show (a statistic, a
comparison, a threshold, where it comes from); the report opens with each claim's measured
value, its 95% interval and a verdict, so a reader sees at once what held.

Verdicts: **holds** when the whole interval lies on the claimed side of the threshold (inside
it for ``within``), **does not hold** when the whole interval lies on the other side, and
**inconclusive** when the interval straddles the threshold, when there is no interval (one
seed), or when the runs lack what the statistic needs; the reason is always given.
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import yaml

from analysis import stats
from analysis.claim_stats import STATISTICS, Context, Missing
from analysis.writer import Table
from study import contract as C

log = logging.getLogger(__name__)

COLUMNS = ("claim", "source", "statistic", "measured", "threshold", "verdict", "why", "figure")


@dataclass
class ClaimResult:
    claim: dict
    estimate: stats.Estimate
    verdict: str
    reason: str

    @property
    def name(self) -> str:
        return str(self.claim.get("name", "?"))


def claims_of(spec_text: str | None) -> list[dict]:
    """The ``claims:`` list of a spec's YAML text ([] without one or when unreadable)."""
    if not spec_text:
        return []
    try:
        raw = yaml.safe_load(spec_text)
    except yaml.YAMLError as err:
        log.warning("the study's spec could not be read for its claims: %s", err)
        return []
    claims = raw.get("claims") if isinstance(raw, dict) else None
    return [c for c in claims if isinstance(c, dict)] if isinstance(claims, list) else []


def _problem(claim: dict) -> str | None:
    """Why a claim cannot be evaluated as written (``study.spec`` refuses such a spec, but a
    report may be given any file)."""
    stat = STATISTICS.get(claim.get("statistic"))
    if stat is None:
        return f"unknown statistic {claim.get('statistic')!r}; known: {', '.join(STATISTICS)}"
    params = claim.get("params") or {}
    missing = [p for p in stat.required if p not in params]
    unknown = [p for p in params if p not in stat.required + stat.optional]
    if missing or unknown:
        return (f"{stat.name} needs {', '.join(stat.required)} (optional: "
                f"{', '.join(stat.optional)}); got {', '.join(map(str, params)) or 'none'}")
    if claim.get("compare") not in C.CLAIM_COMPARES:
        return f"compare must be one of {' '.join(C.CLAIM_COMPARES)}"
    threshold = claim.get("threshold")
    if claim["compare"] == "within":
        if not (isinstance(threshold, list) and len(threshold) == 2):
            return "within needs threshold [low, high]"
    elif isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
        return "threshold must be a number"
    return None


def judge(est: stats.Estimate, compare: str, threshold) -> tuple[str, str]:
    """The verdict of an estimate against ``compare threshold``, and why."""
    if math.isnan(est.value):
        return C.INCONCLUSIVE, est.note or "no value"
    if not est.has_ci:
        return C.INCONCLUSIVE, f"no 95% interval ({est.note or 'too few values'})"
    lo, hi = est.low, est.high
    ci = f"95% CI [{lo:.4g}, {hi:.4g}]"
    if compare == "within":
        a, b = threshold
        if a <= lo and hi <= b:
            return C.HOLDS, f"{ci} inside [{a:g}, {b:g}]"
        if hi < a or lo > b:
            return C.DOES_NOT_HOLD, f"{ci} outside [{a:g}, {b:g}]"
        return C.INCONCLUSIVE, f"{ci} overlaps an end of [{a:g}, {b:g}]"
    t = float(threshold)
    side = {">": (lo > t, hi <= t), ">=": (lo >= t, hi < t),
            "<": (hi < t, lo >= t), "<=": (hi <= t, lo > t)}[compare]
    if side[0]:
        return C.HOLDS, f"{ci} {compare} {t:g}"
    if side[1]:
        return C.DOES_NOT_HOLD, f"{ci} on the other side of {t:g}"
    return C.INCONCLUSIVE, f"{ci} straddles {t:g}"


def evaluate(claims: list[dict], trials: pd.DataFrame, metrics: pd.DataFrame,
             select: str = C.VAL_ACCURACY) -> list[ClaimResult]:
    """Each claim's statistic on the runs and its verdict."""
    ctx = Context(trials, metrics, select)
    out = []
    for claim in claims:
        problem = _problem(claim)
        if problem:
            out.append(ClaimResult(claim, stats.Estimate(math.nan), C.INCONCLUSIVE,
                                   f"invalid claim: {problem}"))
            continue
        try:
            est = STATISTICS[claim["statistic"]].fn(ctx, **(claim.get("params") or {}))
        except Missing as why:
            out.append(ClaimResult(claim, stats.Estimate(math.nan), C.INCONCLUSIVE,
                                   f"missing data: {why}"))
            continue
        out.append(ClaimResult(claim, est, *judge(est, claim["compare"], claim["threshold"])))
    return out


def _statistic_text(claim: dict) -> str:
    params = ", ".join(f"{k}={v}" for k, v in (claim.get("params") or {}).items())
    return f"{claim.get('statistic')}({params})"


def _measured(result: ClaimResult) -> str:
    stat = STATISTICS.get(result.claim.get("statistic"))
    if stat is None or math.isnan(result.estimate.value):
        return "–"
    text = stats.fmt(result.estimate, stat.digits, stat.unit)
    extra = [f"n={result.estimate.n}"] if result.estimate.has_ci else []
    if not math.isnan(result.estimate.p):
        extra.append(f"p={stats.fmt_p(result.estimate.p)}")
    method = result.estimate.method
    return text + (f" ({', '.join(extra)}; {method})" if extra and method else "")


def _threshold(claim: dict) -> str:
    t = claim.get("threshold")
    if claim.get("compare") == "within" and isinstance(t, list):
        return f"within [{', '.join(map(str, t))}]"
    return f"{claim.get('compare')} {t}"


def claims_frame(results: list[ClaimResult]) -> pd.DataFrame:
    """The report's Claims table (what a reader sees)."""
    return pd.DataFrame([{
        "claim": r.name, "source": r.claim.get("source", ""),
        "statistic": _statistic_text(r.claim), "measured": _measured(r),
        "threshold": _threshold(r.claim), "verdict": r.verdict, "why": r.reason,
        "figure": r.claim.get("figure") or ""} for r in results], columns=list(COLUMNS))


def claims_csv(results: list[ClaimResult], path: Path) -> Path:
    """``claims.csv``: the numbers behind the table (value, interval, n, p, verdict)."""
    pd.DataFrame([{
        "name": r.name, "source": r.claim.get("source", ""),
        "statistic": r.claim.get("statistic"), "params": json.dumps(r.claim.get("params") or {}),
        "compare": r.claim.get("compare"), "threshold": json.dumps(r.claim.get("threshold")),
        "value": r.estimate.value, "ci_low": r.estimate.low, "ci_high": r.estimate.high,
        "n": r.estimate.n, "p": r.estimate.p, "method": r.estimate.method,
        "verdict": r.verdict, "reason": r.reason, "figure": r.claim.get("figure") or ""}
        for r in results], columns=["name", "source", "statistic", "params", "compare",
                                    "threshold", "value", "ci_low", "ci_high", "n", "p",
                                    "method", "verdict", "reason", "figure"]).to_csv(
        path, index=False)
    return path


def claims_table(results: list[ClaimResult]) -> Table:
    counts = pd.Series([r.verdict for r in results]).value_counts()
    tally = ", ".join(f"{counts[v]} {v}" for v in (C.HOLDS, C.DOES_NOT_HOLD, C.INCONCLUSIVE)
                      if v in counts)
    note = (f"{len(results)} claims: {tally}. A claim holds when its whole 95% interval lies on "
            "the claimed side of the threshold, does not hold when it lies wholly on the other "
            "side, and is inconclusive otherwise (the interval straddles the threshold, one "
            "seed gives no interval, or the runs lack the data: the reason is given)."
            if results else "The study's spec states no claims (add a claims: section).")
    return Table("claims", "Claims", claims_frame(results), note)


def claim_metrics(results: list[ClaimResult]) -> tuple[dict[str, float], dict[str, str]]:
    """MLflow metrics ``claim/<name>/{value,ci_low,ci_high}`` (finite ones) and tags
    ``claim/<name>/verdict`` for the study's parent run."""
    metrics, tags = {}, {}
    for r in results:
        name = "".join(ch if ch.isalnum() or ch in "_-." else "_" for ch in r.name)
        for what, value in (("value", r.estimate.value), ("ci_low", r.estimate.low),
                            ("ci_high", r.estimate.high)):
            if math.isfinite(value):
                metrics[C.claim_metric(name, what)] = float(value)
        tags[C.claim_metric(name, "verdict")] = r.verdict
    return metrics, tags


def format_claims(paths: list[Path]) -> str:
    """The claims of several studies' ``claims.csv`` as one plain-text table (``make
    reproduce`` prints it): study, claim, measured value with its interval, threshold,
    verdict."""
    rows = []
    for path in paths:
        frame = pd.read_csv(path, dtype={"threshold": str, "reason": str})
        for _, r in frame.iterrows():
            ci = ("" if pd.isna(r["ci_low"]) else f" [{r['ci_low']:.3g}, {r['ci_high']:.3g}]")
            value = "–" if pd.isna(r["value"]) else f"{r['value']:.3g}{ci}"
            threshold = json.loads(r["threshold"]) if isinstance(r["threshold"], str) else ""
            verdict = r["verdict"] + (f" ({r['reason']})" if isinstance(r["reason"], str)
                                      and r["reason"] else "")
            rows.append((Path(path).parent.name, r["name"], value,
                         f"{r['compare']} {threshold}", verdict))
    if not rows:
        return "no claims"
    header = ("study", "claim", "measured [95% CI]", "threshold", "verdict")
    widths = [max(len(str(x[i])) for x in [header, *rows]) for i in range(4)]
    return "\n".join("  ".join(str(x[i]).ljust(widths[i]) for i in range(4)) + "  " + x[4]
                     for x in [header, *rows])
