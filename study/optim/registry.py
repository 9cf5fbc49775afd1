"""Optimizer families by name. A family registers itself with ``@register``: the built-in
families are the modules and packages of ``study/optim/`` (importing the package imports
each of them);
any other family is a plugin, a module or ``.py`` file a spec names under ``plugins:``
(``study/plugins.py``; README, "Adding a family")."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from study.optim.base import Optimizer

FAMILIES: dict[str, type[Optimizer]] = {}


def register(cls):
    if cls.family in FAMILIES and FAMILIES[cls.family] is not cls:
        raise ValueError(f"optimizer family {cls.family!r} registered twice")
    FAMILIES[cls.family] = cls
    return cls


def get_family(name: str) -> type[Optimizer]:
    if name not in FAMILIES:
        raise KeyError(f"unknown optimizer family {name!r}; known: {sorted(FAMILIES)}")
    return FAMILIES[name]


def make_optimizer(family: str, model, loss_fn, lr: float, variant: str | None = None,
                   **options: Any) -> Optimizer:
    return get_family(family)(model, loss_fn, lr, variant, **options)
