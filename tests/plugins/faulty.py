"""A test-only optimizer family that fails on purpose: plain SGD whose ``step`` raises after
``fail_after`` steps (0 = never) and/or sleeps ``sleep_s`` per step (to make short trials last
long enough for a fault to be injected mid-way). Studies load it with ``plugins:
[tests.plugins.faulty]``; the repository root must be on the trial workers' PYTHONPATH."""
from __future__ import annotations

import time

from study.optim.base import Optimizer
from study.optim.options import NonNegative, NonNegativeCount, StepOptions
from study.optim.registry import FAMILIES, register


class InjectedFault(RuntimeError):
    """The failure this family raises, so tests can tell it from a real bug."""


class FaultyOptions(StepOptions):
    fail_after: NonNegativeCount = 0  # steps before step() raises (0 = never)
    sleep_s: NonNegative = 0.0        # seconds slept per step


class Faulty(Optimizer):
    family = "faulty"
    variants = ("sgd",)
    Options = FaultyOptions

    def __init__(self, model, loss_fn, lr, variant=None, **options):
        super().__init__(model, loss_fn, lr, variant, **options)
        self.steps = 0

    def step(self, direction):
        fail_after = self.opts.fail_after
        if fail_after and self.steps >= fail_after:
            raise InjectedFault(f"faulty: injected failure after {self.steps} steps")
        if self.opts.sleep_s:
            time.sleep(self.opts.sleep_s)
        super().step(direction)
        self.steps += 1

    def state_dict(self):
        return {**super().state_dict(), "steps": self.steps}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.steps = state["steps"]


if FAMILIES.get("faulty") is None:   # importing twice (e.g. under two names) registers once
    register(Faulty)
