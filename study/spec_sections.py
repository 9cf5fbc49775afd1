"""The sections of a study spec (``dataset:``, ``models:``, ``families:``, ``search:``, ...)
as pydantic models; ``study.spec.Spec`` puts them together and checks them against each
other."""
from __future__ import annotations

from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PositiveFloat,
    PositiveInt,
    field_validator,
    model_validator,
)

from study import contract
from study.data import DATASETS, FRESH_DATASETS, IMAGE_DATASETS
from study.models import MODELS
from study.shadows import parse_estimators
from study.spec_values import (
    Problem,
    log_range_values,
    parse_lr,
)
from study.toy import SINE2D_SIZE
from study.variance import ProbeSettings

# Training-set sizes before any validation split, used to check batch sizes without loading.
TRAIN_SIZES = {"mnist": 60000, "fashion_mnist": 60000, "cifar10": 50000}
INPUT_SHAPES = {"mnist1d": (1, 40), "mnist": (1, 28, 28), "fashion_mnist": (1, 28, 28),
                "cifar10": (3, 32, 32), "sine2d": (2,)}
MNIST1D_TRAIN_FRACTION = 0.8


def one_of(value: str, choices, what: str) -> str:
    if value not in choices:
        raise Problem(f"unknown {what} {value!r}; choose from {list(choices)}")
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
            raise Problem(f"must be >= low ({self.low}) (got {self.high})", "high")
        return self

    def values(self) -> list[float]:
        return log_range_values(self.low, self.high, self.num)


# Written as a number (``0.1`` = ``[0.1]``), a list of numbers or ``{low, high, num}``;
# ``parse_lr`` checks and normalizes it first, so each mistake gets one message.
LRGrid = list[PositiveFloat] | LogRange


def grid_values(values: LRGrid) -> list[float]:
    return values.values() if isinstance(values, LogRange) else list(values)


def grid_size(values: LRGrid) -> int:
    return values.num if isinstance(values, LogRange) else len(values)


class DatasetSpec(Strict):
    name: str
    size: PositiveInt | None = None          # MNIST-1D: examples generated; others: train cap
    val_fraction: float = Field(0.1, ge=0, lt=1)
    label_noise: float = Field(0.0, ge=0, le=1)       # fraction of training labels randomized
    test_label_noise: float = Field(0.0, ge=0, le=1)  # fraction of test labels randomized
    root: str = "data"
    download: bool = False
    fresh: bool = False       # generated datasets: a new block of `size` examples every epoch
    augment: bool = False     # images: random crop (padding 4) + horizontal flip in training

    @field_validator("name")
    @classmethod
    def _known(cls, v):
        return one_of(v, DATASETS, "dataset")

    @model_validator(mode="after")
    def _options_fit_the_data(self):
        if self.fresh and self.name not in FRESH_DATASETS:
            raise Problem(f"only generated datasets {list(FRESH_DATASETS)} can draw fresh "
                          f"examples (got fresh: true with {self.name})", "fresh")
        if self.fresh and self.label_noise:
            raise Problem("label noise needs stored training labels; not with fresh: true "
                          f"(got {self.label_noise})", "label_noise")
        if self.augment and self.name not in IMAGE_DATASETS:
            raise Problem(f"crops and flips are for images {list(IMAGE_DATASETS)} (got augment: "
                          f"true with {self.name})", "augment")
        return self

    def train_size(self) -> int:
        if self.name == "mnist1d":
            n = int((self.size or 5000) * MNIST1D_TRAIN_FRACTION)
        elif self.name == "sine2d":
            n = self.size or SINE2D_SIZE
        else:
            n = min(self.size or TRAIN_SIZES[self.name], TRAIN_SIZES[self.name])
        return n - int(round(n * self.val_fraction))


class InitSpec(Strict):
    """``init: he_normal`` or ``init: {kind: normal, std: 0.01}`` (``study.models.initialize``)."""

    kind: Literal["default", "he_normal", "normal", "linspace"]
    std: PositiveFloat | None = None          # normal only: the weights' standard deviation

    @model_validator(mode="after")
    def _std_with_normal(self):
        if self.kind == "normal" and self.std is None:
            raise Problem("kind normal needs a std, e.g. {kind: normal, std: 0.01} (got no std)",
                          "std")
        if self.kind != "normal" and self.std is not None:
            raise Problem(f"std is for kind normal only (got std {self.std} with kind "
                          f"{self.kind})", "std")
        return self

    def option(self) -> str | dict[str, Any]:
        """What ``build_model`` takes: the kind alone, or ``{kind, std}``."""
        return self.kind if self.std is None else {"kind": self.kind, "std": self.std}


class ModelSpec(Strict):
    name: str
    widths: list[PositiveInt] | None = None
    channels: list[PositiveInt] | None = None
    norm: Literal["group", "none"] | None = None  # resnets only; default group
    activation: Literal["relu", "tanh", "sigmoid"] | None = None   # mlp only; default relu
    init: InitSpec | None = None              # default: torch's own initialization

    @field_validator("name")
    @classmethod
    def _known(cls, v):
        return one_of(v, MODELS, "model")

    @field_validator("init", mode="before")
    @classmethod
    def _init_shorthand(cls, v):
        return {"kind": v} if isinstance(v, str) else v

    @model_validator(mode="after")
    def _activation_of_mlp(self):
        if self.activation is not None and self.name != "mlp":
            raise Problem(f"only mlp has an activation to choose (got {self.activation!r} for "
                          f"{self.name})", "activation")
        return self

    def options(self) -> dict[str, Any]:
        out = self.model_dump(exclude={"name", "init"}, exclude_none=True)
        if self.init is not None:
            out["init"] = self.init.option()
        return out


class FamilySpec(Strict):
    variants: list[str] | None = Field(None, min_length=1)
    lr: LRGrid | None = None                  # overrides the study-wide lr grid
    options: dict[str, Any] = {}              # option -> value or list of values (a grid)

    _lr = field_validator("lr", mode="before")(classmethod(lambda cls, v: parse_lr(v)))

    def num_arms(self) -> int:
        """Variants (the family's first when none is named) × option combinations, counted."""
        n = len(self.variants) if self.variants else 1
        for value in self.options.values():
            n *= len(value) if isinstance(value, list) else 1
        return n


class SelectSpec(Strict):
    """How the report picks each family's tuned setting: the best seed-mean ``metric`` (a loss:
    the lowest; an accuracy: the highest) at ``epoch`` (default: the trial's last). sngrad's
    protocol: ``{metric: train_loss, epoch: 2}``."""

    metric: str
    epoch: PositiveInt | None = None

    @field_validator("metric")
    @classmethod
    def _selectable(cls, v):
        if v.startswith("test_"):
            raise Problem(f"selecting on {v!r} would let test data choose the setting; use a "
                          "train_ or val_ metric")
        return one_of(v, [m for m in contract.SELECTION_MODES if not m.startswith("test_")],
                       "selection metric")

    def key(self) -> str:
        return contract.selection_key(self.metric, self.epoch)


class SearchSpec(Strict):
    kind: Literal["grid", "optuna"] = "grid"
    num_samples: PositiveInt = 20
    sampler: Literal["tpe", "random"] = "tpe"
    seed: int = 0
    metric: str = "val_accuracy"
    mode: Literal["max", "min"] = "max"
    max_trials: PositiveInt = 10_000          # refuse studies with more trials than this
    select: SelectSpec | None = None          # what picks the tuned setting in the report

    @field_validator("metric")
    @classmethod
    def _reported(cls, v):
        if v not in contract.EPOCH_METRICS:
            raise Problem(f"unknown metric {v!r}; a trial reports: "
                          + ", ".join(contract.EPOCH_METRICS))
        return v


class SchedulerSpec(Strict):
    kind: Literal["none", "asha"] = "none"
    grace_period: PositiveInt = 1
    reduction_factor: float = Field(3.0, gt=1)


class StopSpec(Strict):
    """End a trial at the first epoch its ``metric`` is below / above a target (McCandlish et
    al.'s protocol counts steps to a target loss; training on is wasted). Also a budget cap:
    ``epochs`` still bounds a trial that never gets there."""

    metric: str
    below: float | None = None
    above: float | None = None

    @model_validator(mode="after")
    def _one_target(self):
        if self.metric not in contract.EPOCH_METRICS:
            raise Problem(f"{self.metric!r} is not a metric a trial reports every epoch; one of "
                          f"{list(contract.EPOCH_METRICS)}", "metric")
        if self.metric.startswith("test_"):
            raise Problem(f"stopping on {self.metric!r} would let test data decide training; "
                          "use a train_ or val_ metric", "metric")
        if (self.below is None) == (self.above is None):
            raise Problem(f"give one of below / above (got below={self.below}, "
                          f"above={self.above})", "below")
        return self

    def reached(self, metrics: dict[str, Any]) -> bool:
        value = metrics.get(self.metric)
        if value is None:
            return False
        return value <= self.below if self.below is not None else value >= self.above


class CheckpointSpec(Strict):
    """How often a trial saves its state: at the end of the first epoch ``every_s`` seconds
    after its last checkpoint, and always at its last epoch. One file per trial, overwritten,
    so storage stays flat; an interrupted trial repeats at most ``every_s`` of work."""

    every_s: float = Field(5.0, ge=0)         # 0 = every epoch


class EvaluateSpec(Strict):
    """Which epochs evaluate the train / val / test splits (and report to Tune): every
    ``every``-th and always the last; the training metrics over ``train_examples`` of the
    training split (DeepOBS's train-eval set: a fixed sample, the same in every trial; the
    whole split when unset or not smaller), the divergence reference (the training loss at
    the initial weights) too. On a small dataset evaluating costs as much as an
    epoch of training at large batches (README, Benchmarks)."""

    every: PositiveInt = 1
    train_examples: PositiveInt | None = None


class ResourcesSpec(Strict):
    cpu: PositiveFloat = 1.0
    gpu: float = Field(0.0, ge=0, le=1)       # a fraction of one GPU per trial
    max_concurrent: PositiveInt | None = None


class MeasureSpec(Strict):
    """Gradient-variance measurement (Faghri's get_Ege_var) on its own batches.

    When: ``points`` measurements per trial spread over its training (``spacing``: linear,
    or log = denser early), so every batch size gets the same number; or, instead, one
    every ``every`` iterations (exclusive with points). Neither set: 8 points, linear."""

    points: int | None = Field(None, ge=0)    # measurements per trial; 0 = off
    spacing: Literal["linear", "log"] | None = None   # how points spread; default linear
    every: int | None = Field(None, ge=0)     # or: iterations between measurements; 0 = off
    batches: PositiveInt = 5                  # mini-batches per estimate (gviter)
    start: int = Field(0, ge=0)               # first iteration measured
    histograms: bool = True                   # per-layer |gradient| histograms
    histogram_points: PositiveInt = 8         # log-spaced iterations with a histogram
    # other families' directions measured along this trajectory (Faghri et al.'s design):
    # "sgd_2b", "svrg", "gc" or {name, family, variant, options, batch_scale}; study.shadows
    estimators: list[str | dict[str, Any]] = []

    @field_validator("estimators")
    @classmethod
    def _estimators(cls, entries):
        try:
            parse_estimators(entries)
        except ValueError as err:
            field, _, message = str(err).partition(": ")
            raise Problem(message, field.removeprefix("estimators")) from None
        return entries

    @model_validator(mode="after")
    def _one_schedule(self):
        if self.every is not None and self.points is not None:
            raise Problem("set either points (measurements per trial) or every (iterations "
                          f"between measurements), not both (got every={self.every}, "
                          f"points={self.points})", "every")
        if self.spacing is not None and self.every is not None:
            raise Problem("spacing spreads measure.points; it does not apply with every "
                          f"(got spacing={self.spacing!r}, every={self.every})", "spacing")
        return self

    def settings(self) -> ProbeSettings | None:
        """The probe's own settings; None when it would measure nothing."""
        out = ProbeSettings(**self.model_dump(exclude={"spacing", "estimators"}),
                            spacing=self.spacing or "linear",
                            estimators=parse_estimators(self.estimators))
        if not out.measures and not self.histograms:
            return None
        return out


class TrackingSpec(Strict):
    uri: str = "sqlite:///mlflow.db"
