"""What picks a family's tuned setting: a metric's final value (the default, DeepOBS's
protocol: ``val_accuracy``) or its value at an epoch (sngrad's: ``train_loss`` after 2
epochs), named as ``contract.selection_key`` names it ('train_loss@2'; a spec's
``search.select``). A value at an epoch is read from the metric histories and added to the
trials frame as a column of that name, so every table selects on it the same way.
"""
from __future__ import annotations

import pandas as pd
import yaml

from study import contract as C

SELECTIONS = C.SELECTION_MODES


def metric_of(select: str) -> str:
    return C.parse_selection(select)[0]


def check(select: str) -> str:
    if metric_of(select) not in SELECTIONS:
        raise ValueError(f"select={select!r}: must be one of {sorted(SELECTIONS)}, or one of "
                         f"them at an epoch ('train_loss{C.SELECT_AT}2')")
    return select


def mode(select: str) -> str:
    """'min' or 'max': which end of the metric is best."""
    return SELECTIONS[metric_of(check(select))]


def describe(select: str) -> str:
    """'max final val_accuracy', 'min train_loss at epoch 2'."""
    metric, epoch = C.parse_selection(check(select))
    return f"{mode(select)} {'final ' if epoch is None else ''}{metric}" + (
        f" at epoch {epoch}" if epoch is not None else "")


def with_selection_column(trials: pd.DataFrame, metrics: pd.DataFrame,
                          select: str) -> pd.DataFrame:
    """``trials`` with the column ``select`` when it names a metric at an epoch: each run's
    value of the metric at the step where it logged that epoch (NaN for a run that never
    reached it). A final metric is already a column: ``trials`` comes back unchanged."""
    metric, epoch = C.parse_selection(check(select))
    if epoch is None:
        return trials
    out = trials.copy()
    if metrics.empty:
        out[select] = float("nan")
        return out
    at = metrics[(metrics["key"] == C.EPOCH) & (metrics["value"] == epoch)][["run_id", "step"]]
    values = metrics[metrics["key"] == metric].merge(at, on=["run_id", "step"])
    out[select] = out["run_id"].map(values.groupby("run_id")["value"].last())
    return out


def of_spec(spec_text: str | None) -> str:
    """The selection a study's spec asks for: ``search.select`` (validated by ``study.spec``
    when the sweep started), else ``search.metric`` where it can select, else val_accuracy."""
    try:
        raw = yaml.safe_load(spec_text) if spec_text else None
    except yaml.YAMLError:
        raw = None
    search = raw.get("search") if isinstance(raw, dict) else None
    search = search if isinstance(search, dict) else {}
    chosen = search.get("select")
    if isinstance(chosen, dict) and chosen.get("metric") in SELECTIONS:
        return C.selection_key(chosen["metric"], chosen.get("epoch"))
    metric = search.get("metric")
    return metric if metric in SELECTIONS else C.VAL_ACCURACY
