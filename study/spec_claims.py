"""The ``claims:`` section of a study spec: what the study should show, each claim checked
against the contract's statistics, figures and metric names before anything starts
(``study.spec.Spec`` checks the names it gives against the study itself)."""
from __future__ import annotations

from typing import Any, Literal

from pydantic import field_validator, model_validator

from study import contract
from study.spec_sections import Strict, one_of
from study.spec_values import Problem, check_name, shown

NUMBER_PARAMS = ("target",)                 # claim parameters that are numbers
# claim parameters naming var/<name>_<statistic> keys
VARIANCE_PARAMS = ("estimator", "lower", "upper", "value", "better", "worse")
METRIC_PARAMS = ("x", "y")                                   # a final metric of every trial
NAME_PARAMS = ("family", "baseline", "model", "dataset")


def _variance_key(value: str) -> bool:
    name = value.removeprefix(contract.VARIANCE_PREFIX)
    return any(name.endswith("_" + s) and len(name) > len(s) + 1
               for s in contract.VARIANCE_STATISTICS)


class ClaimSpec(Strict):
    """A claim the study should show: ``statistic`` (``contract.CLAIM_STATISTICS``) with its
    ``params``, compared to ``threshold``; ``analysis.claims`` measures and judges it."""

    name: str                                # MLflow keys claim/<name>/...: a plain name
    source: str                              # the citation the claim comes from
    statistic: str
    params: dict[str, Any] = {}
    compare: Literal[">", "<", ">=", "<=", "within"]
    threshold: Any                           # a number; [low, high] for within
    figure: str | None = None                # a report figure that shows it

    _name = field_validator("name")(classmethod(lambda cls, v: check_name(v)))

    @field_validator("statistic")
    @classmethod
    def _known(cls, v):
        return one_of(v, contract.CLAIM_STATISTICS, "statistic")

    @field_validator("figure")
    @classmethod
    def _figure(cls, v):
        return v if v is None else one_of(v, contract.REPORT_FIGURES, "figure")

    @model_validator(mode="after")
    def _params(self):
        required, optional = contract.CLAIM_STATISTICS[self.statistic]
        takes = f"{self.statistic} takes {', '.join(required + optional)}"
        for key, value in self.params.items():
            if key not in required + optional:
                raise Problem(f"unknown parameter {key!r}; {takes} (got {shown(value)})",
                              f"params.{key}")
            if key in NUMBER_PARAMS:
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise Problem(f"must be a number (got {shown(value)})", f"params.{key}")
                continue
            if not isinstance(value, str):
                raise Problem(f"must be a name (text) (got {shown(value)})", f"params.{key}")
            if key in VARIANCE_PARAMS and not _variance_key(value):
                raise Problem("must be a variance key <estimator>_<statistic> such as dir_var "
                              f"or sgd_nvar (statistics: {', '.join(contract.VARIANCE_STATISTICS)}"
                              f") (got {shown(value)})", f"params.{key}")
            if (key in METRIC_PARAMS and value not in contract.EPOCH_METRICS
                    and not (value.startswith(contract.VARIANCE_PREFIX) or _variance_key(value))):
                raise Problem("must be a metric every trial logs ("
                              + ", ".join(contract.EPOCH_METRICS) + f", or var/...) (got "
                              f"{shown(value)})", f"params.{key}")
        missing = [k for k in required if k not in self.params]
        if missing:
            raise Problem(f"{self.statistic} needs {', '.join(missing)}; {takes} (got "
                          f"{shown(self.params)})", "params")
        return self

    @model_validator(mode="after")
    def _threshold(self):
        t = self.threshold

        def number(v):
            return not isinstance(v, bool) and isinstance(v, (int, float)) and v == v
        if self.compare == "within":
            if not (isinstance(t, list) and len(t) == 2 and all(map(number, t)) and t[0] <= t[1]):
                raise Problem(f"within needs [low, high] with low <= high (got {shown(t)})",
                              "threshold")
        elif not number(t):
            raise Problem(f"must be a number for compare {self.compare!r} (got {shown(t)})",
                          "threshold")
        return self
