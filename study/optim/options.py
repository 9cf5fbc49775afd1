"""A family's options as a typed model (optax style: typed keyword arguments with defaults).

Each family declares ``class Options(StepOptions)`` with constrained fields; the spec checks
every grid point of every variant against it before anything starts, and the family reads
typed attributes (``self.opts.damping``). A bad value is one ``OptionError`` naming
``<family>.options.<key>`` and the value. Strict types: YAML numbers only (``"1e-3"`` is text).
"""
from __future__ import annotations

import types
import typing
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

Momentum = Annotated[float, Field(ge=0, lt=1)]
Fraction = Annotated[float, Field(ge=0, lt=1)]      # an EMA decay, a beta
NonNegative = Annotated[float, Field(ge=0)]
Positive = Annotated[float, Field(gt=0)]
Count = Annotated[int, Field(ge=1)]                # periods, iterations, clusters
NonNegativeCount = Annotated[int, Field(ge=0)]     # 0 = off


class FamilyOptions(BaseModel):
    """Options with defaults; unknown names and wrong types are refused."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    def check(self, family: str, variant: str) -> None:
        """Constraints that involve the variant (raise ``OptionError``); none by default."""


class StepOptions(FamilyOptions):
    """What the default update rule reads: SGD with heavy-ball momentum and weight decay."""

    momentum: Momentum = 0.0
    weight_decay: NonNegative = 0.0


class OptionError(ValueError):
    """One bad option: ``<family>.options.<field>: <message> (got <value>)``."""

    def __init__(self, family: str, field: str, message: str, value: Any):
        super().__init__(f"{family}.options.{field}: {message} (got {value!r})")
        self.family, self.field, self.message, self.value = family, field, message, value


def parse_options(cls: type[FamilyOptions], family: str, variant: str,
                  values: dict[str, Any]) -> FamilyOptions:
    """``values`` checked against ``cls`` (and the variant); the first problem raises."""
    try:
        options = cls.model_validate(values)
    except ValidationError as err:
        first = err.errors()[0]
        field = ".".join(str(p) for p in first["loc"])
        message = first["msg"]
        if first["type"] == "extra_forbidden":
            message = f"unknown option; known: {', '.join(cls.model_fields) or 'none'}"
        raise OptionError(family, field, message, first.get("input")) from None
    options.check(family, variant)
    return options


_BOUNDS = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}


def describe(cls: type[FamilyOptions]) -> dict[str, str]:
    """Option -> 'type = default (constraints)', for ``python -m study families``."""
    out = {}
    for name, info in cls.model_fields.items():
        kind, metadata = _type_text(info.annotation)
        limits = [f"{sign} {getattr(m, k)}" for m in [*info.metadata, *metadata]
                  for k, sign in _BOUNDS.items() if getattr(m, k, None) is not None]
        out[name] = f"{kind} = {info.default!r}" + (f" ({', '.join(limits)})" if limits else "")
    return out


def _type_text(annotation) -> tuple[str, list]:
    """('float or None', constraints inside) for an annotation."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        return " | ".join(repr(a) for a in args), []
    if origin is typing.Annotated:
        text, inner = _type_text(args[0])
        metadata = [m for a in args[1:] for m in getattr(a, "metadata", [a])]  # Field(gt=0)
        return text, [*metadata, *inner]
    if origin in (typing.Union, types.UnionType):
        parts = [_type_text(a) for a in args]
        return " or ".join(t for t, _ in parts), [m for _, ms in parts for m in ms]
    return ("None" if annotation is type(None) else getattr(annotation, "__name__",
                                                             str(annotation))), []
