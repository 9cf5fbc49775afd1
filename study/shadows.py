"""Shadow estimators: other families' step directions, measured along the trajectory the
trial's own optimizer trains (Faghri et al. 2020's design: train SGD, measure SGD at B and at
2B, SVRG and GC at the same weights; gvar_code's ``MinVarianceGradient`` keeps the studied
estimator beside the training one).

A shadow is an optimizer of another family on the same model. It keeps its own state along
the trained trajectory by running its own scheduled work (SVRG's snapshots, GC's clusters,
K-FAC's factors) on its own schedule and generator stream, and is only ever asked for
``direction`` — never ``step``: state that a family builds by stepping (momentum, Adam's
moments, well-tempered's windows) stays at its start. Its work runs with the global RNG
saved and restored and never writes the model, so training is bit-identical with and without
shadows; its cost is counted apart (``shadow_grad_evals``).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch

from study import contract as C
from study.data import DataSplit, epoch_generator
from study.optim import Context, Optimizer, make_optimizer
from study.optim.base import scheduled_work

NAME = re.compile(r"[a-z][a-z0-9_]*")
SHADOW_STREAM = -100
"""Generator streams of shadows' scheduled work: SHADOW_STREAM − i for the i-th shadow (the
trial's own work uses −1, training 0, the probe positive streams)."""


@dataclass(frozen=True)
class EstimatorSettings:
    """One shadow: a family (its variant and options) measured at ``batch_scale`` × B."""

    name: str                          # var/<name>_* in the metrics
    family: str
    variant: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    batch_scale: int = 1               # sgd_2b: SGD measured at batch 2B


def parse_estimators(entries: list[str | dict[str, Any]]) -> tuple[EstimatorSettings, ...]:
    """The spec's ``measure.estimators``, checked (each problem a ``ValueError`` that names
    ``estimators[i]``). An entry is ``"svrg"`` (a family on its defaults), ``"sgd_2b"`` (a
    family at batch 2B) or a mapping ``{name, family, variant, options, batch_scale}``.
    ``"sgd"`` is the probe's own plain-gradient measurement (``var/sgd_*``): nothing to add."""
    from study.optim import FAMILIES
    from study.optim.options import OptionError, parse_options

    out: list[EstimatorSettings] = []
    for i, entry in enumerate(entries):
        where = f"estimators[{i}]"
        if entry == C.SGD_GRADIENT:
            continue
        try:
            settings = _one_estimator(entry)
        except TypeError as err:
            raise ValueError(f"{where}: {err} (got {entry!r})") from None
        if not NAME.fullmatch(settings.name) or settings.name == C.DIRECTION:
            raise ValueError(f"{where}: the name {settings.name!r} must match {NAME.pattern} "
                             f"and not be {C.DIRECTION!r} (it names var/<name>_* metrics)")
        if settings.name == C.SGD_GRADIENT:
            raise ValueError(f"{where}: the name 'sgd' is the probe's own plain gradient "
                             "(var/sgd_*); give this estimator a name of its own")
        if settings.name in [s.name for s in out]:
            raise ValueError(f"{where}: {settings.name!r} is listed twice")
        if settings.family not in FAMILIES:
            raise ValueError(f"{where}: unknown optimizer family {settings.family!r}; known: "
                             f"{sorted(FAMILIES)}")
        family = FAMILIES[settings.family]
        variant = settings.variant or family.variants[0]
        if variant not in family.variants:
            raise ValueError(f"{where}: unknown variant {variant!r} of {settings.family}; "
                             f"choose from {list(family.variants)}")
        if settings.batch_scale < 1:
            raise ValueError(f"{where}.batch_scale: must be >= 1 (got {settings.batch_scale})")
        try:
            parse_options(family.Options, settings.family, variant, settings.options)
        except OptionError as err:
            raise ValueError(f"{where}.options.{err.field}: {err.message} "
                             f"(got {err.value!r})") from None
        out.append(settings)
    return tuple(out)


def _one_estimator(entry: str | dict[str, Any]) -> EstimatorSettings:
    if isinstance(entry, dict):
        entry = {"name": entry.get("family"), **entry}
        return EstimatorSettings(**entry)
    if not isinstance(entry, str):
        raise TypeError("an estimator is a family name or a mapping")
    family, scale = entry, 1
    if entry.endswith("_2b"):
        family, scale = entry[:-3], 2
    variant = "plain" if family == "sgd" else None   # SGD's direction without momentum
    return EstimatorSettings(entry, family, variant, {}, scale)


class Shadow:
    """A shadow estimator in a trial: its optimizer, its scheduled work and its cost."""

    def __init__(self, settings: EstimatorSettings, index: int, model: torch.nn.Module,
                 loss_fn, lr: float, train: DataSplit, batch_size: int, seed: int):
        self.settings, self.name = settings, settings.name
        self.opt: Optimizer = make_optimizer(settings.family, model, loss_fn, lr,
                                             settings.variant, **settings.options)
        self.train, self.seed, self.stream = train, seed, SHADOW_STREAM - index
        self.batch_size = min(len(train), batch_size * settings.batch_scale)
        self.periodic = self.opt.periodic()
        self.ctx: Context | None = None
        self.grad_evals = 0

    def begin_epoch(self, epoch: int, iteration: int) -> None:
        self.ctx = Context(self.opt.model, self.opt.loss_fn, self.train, self.batch_size,
                           iteration, epoch, epoch_generator(self.seed, epoch, self.stream))

    def work(self, counter: int, unit: str = "iter") -> int:
        """The shadow's scheduled work due at ``counter``, RNG-isolated; returns its cost."""
        if not any(w.due(unit, counter) for w in self.periodic):
            return 0                  # the common case: no RNG fork on every iteration
        with torch.random.fork_rng(devices=_devices(self.opt)):
            cost = scheduled_work(self.periodic, self.ctx, counter, unit)
        self.grad_evals += cost
        return cost

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.opt.state_dict(), "grad_evals": self.grad_evals}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.opt.load_state_dict(state["optimizer"])
        self.grad_evals = state["grad_evals"]


def _devices(opt: Optimizer) -> list:
    device = opt.params[0].device
    return [device] if device.type == "cuda" else []
