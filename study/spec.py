"""A study spec: YAML -> a validated ``Spec`` -> the list of trial configurations.

Everything a user can get wrong is caught here, before Ray or MLflow start: unknown keys,
wrong types, non-positive learning rates, empty grids, unknown families / variants /
options / datasets / models, batch sizes larger than the training set, GPU fractions above
one. Errors name the field and the value (``SpecError``).
"""
from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PositiveFloat,
    PositiveInt,
    ValidationError,
    field_validator,
    model_validator,
)

from study.data import DATASETS
from study.models import MODELS

# Training-set sizes before any validation split, used to check batch sizes without loading.
TRAIN_SIZES = {"mnist": 60000, "fashion_mnist": 60000, "cifar10": 50000}
INPUT_SHAPES = {"mnist1d": (1, 40), "mnist": (1, 28, 28), "fashion_mnist": (1, 28, 28),
                "cifar10": (3, 32, 32)}
MNIST1D_TRAIN_FRACTION = 0.8


class SpecError(ValueError):
    """A spec problem; the message names the field and the offending value."""


def _one_of(value: str, choices, what: str) -> str:
    if value not in choices:
        raise ValueError(f"unknown {what} {value!r}; choose from {list(choices)}")
    return value


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LogRange(Strict):
    """``{low: 1e-4, high: 1, num: 9}``: ``num`` log-spaced values from low to high."""

    low: PositiveFloat
    high: PositiveFloat
    num: PositiveInt

    @model_validator(mode="after")
    def _ordered(self):
        if self.high < self.low:
            raise ValueError(f"high ({self.high}) must be >= low ({self.low})")
        return self

    def values(self) -> list[float]:
        if self.num == 1:
            return [self.low]
        step = (math.log(self.high) - math.log(self.low)) / (self.num - 1)
        return [float(f"{math.exp(math.log(self.low) + i * step):.6g}") for i in range(self.num)]


LRGrid = list[PositiveFloat] | LogRange


def _grid(values: LRGrid) -> list[float]:
    return values.values() if isinstance(values, LogRange) else list(values)


class DatasetSpec(Strict):
    name: str
    size: PositiveInt | None = None          # MNIST-1D: examples generated; others: train cap
    val_fraction: float = Field(0.1, ge=0, lt=1)
    label_noise: float = Field(0.0, ge=0, le=1)
    root: str = "data"
    download: bool = False

    @field_validator("name")
    @classmethod
    def _known(cls, v):
        return _one_of(v, DATASETS, "dataset")

    def train_size(self) -> int:
        if self.name == "mnist1d":
            n = int((self.size or 5000) * MNIST1D_TRAIN_FRACTION)
        else:
            n = min(self.size or TRAIN_SIZES[self.name], TRAIN_SIZES[self.name])
        return n - int(round(n * self.val_fraction))


class ModelSpec(Strict):
    name: str
    widths: list[PositiveInt] | None = None
    channels: list[PositiveInt] | None = None
    norm: Literal["group", "none"] | None = None  # resnet8 only; default group

    @field_validator("name")
    @classmethod
    def _known(cls, v):
        return _one_of(v, MODELS, "model")

    def options(self) -> dict[str, Any]:
        return self.model_dump(exclude={"name"}, exclude_none=True)


class FamilySpec(Strict):
    variants: list[str] | None = Field(None, min_length=1)
    lr: LRGrid | None = None                  # overrides the study-wide lr grid
    options: dict[str, Any] = {}              # option -> value or list of values (a grid)


class SearchSpec(Strict):
    kind: Literal["grid", "optuna"] = "grid"
    num_samples: PositiveInt = 20
    sampler: Literal["tpe", "random"] = "tpe"
    seed: int = 0
    metric: str = "val_accuracy"
    mode: Literal["max", "min"] = "max"


class SchedulerSpec(Strict):
    kind: Literal["none", "asha"] = "none"
    grace_period: PositiveInt = 1
    reduction_factor: float = Field(3.0, gt=1)


class ResourcesSpec(Strict):
    cpu: PositiveFloat = 1.0
    gpu: float = Field(0.0, ge=0, le=1)       # a fraction of one GPU per trial
    max_concurrent: PositiveInt | None = None


class MeasureSpec(Strict):
    """Gradient-variance measurement (Faghri's get_Ege_var) on its own batches."""

    every: int = Field(100, ge=0)             # iterations between measurements; 0 = off
    batches: PositiveInt = 5                  # mini-batches per estimate (gviter)
    start: int = Field(0, ge=0)               # first iteration measured
    histograms: bool = True                   # per-layer |gradient| histograms
    histogram_points: PositiveInt = 8         # log-spaced iterations with a histogram


class TrackingSpec(Strict):
    uri: str = "sqlite:///mlflow.db"


class Spec(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$", min_length=1)
    dataset: DatasetSpec
    models: list[ModelSpec] = Field(min_length=1)
    epochs: PositiveInt
    seeds: list[int] = Field([0], min_length=1)
    lr: LRGrid
    batch_size: list[PositiveInt] = Field(min_length=1)
    families: dict[str, FamilySpec | None] = Field(min_length=1)
    search: SearchSpec = SearchSpec()
    scheduler: SchedulerSpec = SchedulerSpec()
    resources: ResourcesSpec = ResourcesSpec()
    measure: MeasureSpec = MeasureSpec()
    tracking: TrackingSpec = TrackingSpec()
    storage: str = "results"
    max_failures: int = Field(2, ge=0)
    plugins: list[str] = []                  # extra modules registering optimizer families

    @model_validator(mode="before")
    @classmethod
    def _import_plugins(cls, raw):
        """Plugins register their families before ``families`` is validated."""
        import importlib

        for module in (raw.get("plugins") or []) if isinstance(raw, dict) else []:
            try:
                importlib.import_module(module)
            except ImportError as err:
                raise ValueError(f"plugins: cannot import {module!r} ({err})") from None
        return raw

    @model_validator(mode="after")
    def _metric_exists(self):
        if self.search.metric.startswith("val_") and self.dataset.val_fraction == 0:
            raise ValueError(f"search.metric: {self.search.metric!r} needs a validation split, "
                             "but dataset.val_fraction is 0")
        return self

    @field_validator("lr")
    @classmethod
    def _lr_nonempty(cls, v):
        if isinstance(v, list) and not v:
            raise ValueError("the learning-rate grid is empty")
        return v

    @field_validator("families")
    @classmethod
    def _families(cls, fams):
        from study.optim import FAMILIES

        out = {}
        for name, fam in fams.items():
            if name not in FAMILIES:
                raise ValueError(f"unknown optimizer family {name!r}; known: {sorted(FAMILIES)}")
            fam = fam or FamilySpec()
            cls_ = FAMILIES[name]
            for v in fam.variants or []:
                if v not in cls_.variants:
                    raise ValueError(f"{name}.variants: unknown variant {v!r}; "
                                     f"choose from {list(cls_.variants)}")
            if isinstance(fam.lr, list) and not fam.lr:
                raise ValueError(f"{name}.lr: the learning-rate grid is empty")
            for key, value in fam.options.items():
                _check_option(name, cls_.options, key, value)
            out[name] = fam
        return out

    @model_validator(mode="after")
    def _batch_fits(self):
        n = self.dataset.train_size()
        for b in self.batch_size:
            if b > n:
                raise ValueError(f"batch_size: {b} is larger than the training set "
                                 f"({n} examples of {self.dataset.name} after the "
                                 "validation split)")
        return self

    @model_validator(mode="after")
    def _arms_build(self):
        """Build every arm's model and optimizer once (no data, no training), so option
        values only a family can judge (``snapshot_unit: weeks``) fail here, not in a trial."""
        import torch

        from study.models import build_model
        from study.optim import make_optimizer

        for arm in self.arms():
            try:
                model = build_model(arm["model"], INPUT_SHAPES[self.dataset.name], 10,
                                    **arm["model_options"])
            except ValueError as err:
                raise ValueError(f"models: {err}") from None
            try:
                make_optimizer(arm["family"], model, torch.nn.functional.cross_entropy,
                               min(self.lr_grid(arm["family"])), arm["variant"], **arm["options"])
            except (ValueError, TypeError) as err:
                raise ValueError(f"families.{arm['family']}: {err} "
                                 f"(options {arm['options']})") from None
        return self

    # -- derived ------------------------------------------------------------------------------
    def lr_grid(self, family: str) -> list[float]:
        fam = self.families[family]
        return _grid(fam.lr if fam and fam.lr is not None else self.lr)

    def arms(self) -> list[dict[str, Any]]:
        """Every (model, family, variant, options) combination, with a readable label."""
        from study.optim import FAMILIES

        arms = []
        for model in self.models:
            for name, fam in self.families.items():
                grids = {k: v if isinstance(v, list) else [v] for k, v in fam.options.items()}
                varying = [k for k, v in grids.items() if len(v) > 1]
                for variant in fam.variants or [FAMILIES[name].variants[0]]:
                    for combo in itertools.product(*grids.values()):
                        options = dict(zip(grids, combo))
                        label = f"{_model_label(model, self.models)}/{name}/{variant}"
                        if varying:
                            label += "[" + ",".join(f"{k}={options[k]}" for k in varying) + "]"
                        arms.append({"arm": label, "model": model.name,
                                     "model_options": model.options(), "family": name,
                                     "variant": variant, "options": options})
        return arms

    def trials(self) -> list[dict[str, Any]]:
        """The full grid: arms × lr (per family) × batch size × seed."""
        return [{**arm, "lr": lr, "batch_size": bs, "seed": seed}
                for arm in self.arms() for lr in self.lr_grid(arm["family"])
                for bs in self.batch_size for seed in self.seeds]

    def num_trials(self) -> int:
        return len(self.trials()) if self.search.kind == "grid" else self.search.num_samples


def _model_label(model: ModelSpec, models: list[ModelSpec]) -> str:
    same = [m for m in models if m.name == model.name]
    if len(same) == 1:
        return model.name
    return f"{model.name}{same.index(model)}"


def _check_option(family: str, defaults: dict[str, Any], key: str, value: Any) -> None:
    if key not in defaults:
        raise ValueError(f"{family}.options: unknown option {key!r}; known: {sorted(defaults)}")
    values = value if isinstance(value, list) else [value]
    if not values:
        raise ValueError(f"{family}.options.{key}: empty list")
    default = defaults[key]
    for v in values:
        if default is None or isinstance(default, str) and isinstance(v, str):
            continue
        if isinstance(default, bool) or isinstance(v, bool):
            ok = isinstance(default, bool) and isinstance(v, bool)
        elif isinstance(default, (int, float)):
            fractional_for_int = (isinstance(default, int) and isinstance(v, float)
                                  and not float(v).is_integer())
            ok = isinstance(v, (int, float)) and not fractional_for_int
        else:
            ok = isinstance(v, type(default))
        if not ok:
            raise ValueError(f"{family}.options.{key}: {v!r} is not a {type(default).__name__}")
        if isinstance(v, (int, float)) and not isinstance(v, bool) and v < 0:
            raise ValueError(f"{family}.options.{key}: {v!r} must be >= 0")


# -- loading ---------------------------------------------------------------------------------

def load_spec(path: str | Path) -> Spec:
    path = Path(path)
    if not path.exists():
        raise SpecError(f"{path}: no such spec file")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise SpecError(f"{path}: YAML syntax error: {err}") from err
    return parse_spec(raw, source=str(path))


def parse_spec(raw: Any, source: str = "<spec>") -> Spec:
    if not isinstance(raw, dict):
        raise SpecError(f"{source}: a spec is a mapping of fields, got {type(raw).__name__}")
    try:
        return Spec.model_validate(raw)
    except ValidationError as err:
        raise SpecError(f"{source}: invalid spec\n" + _format(err)) from None


def _format(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"] if not str(p).startswith(("list[", "function-")))
        msg = e["msg"].removeprefix("Value error, ")
        value = e.get("input")
        shown = "" if isinstance(value, dict) and value else f" (got {value!r})"
        lines.append(f"  {loc}: {msg}{shown}" if loc else f"  {msg}")
    return "\n".join(dict.fromkeys(lines))
