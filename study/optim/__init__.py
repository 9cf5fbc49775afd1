"""Optimizer families on one interface (see ``base.py``). Importing this package registers
every family module found in it."""
import importlib
import pkgutil

from study.optim.base import Context, Direction, Optimizer, Periodic, gradient
from study.optim.options import FamilyOptions, StepOptions
from study.optim.registry import FAMILIES, get_family, make_optimizer, register

for _mod in pkgutil.iter_modules(__path__):
    if _mod.name not in {"base", "options", "registry", "update"}:
        importlib.import_module(f"{__name__}.{_mod.name}")

__all__ = ["FAMILIES", "Context", "Direction", "FamilyOptions", "Optimizer", "Periodic",
           "StepOptions", "get_family", "gradient", "make_optimizer", "register"]
