"""Baselines: SGD (plain, heavy-ball momentum, Nesterov) on the mini-batch gradient."""
from __future__ import annotations

from study.optim.base import Optimizer
from study.optim.options import Momentum, NonNegative, OptionError, StepOptions
from study.optim.registry import register
from study.optim.update import SGDRule


class SGDOptions(StepOptions):
    momentum: Momentum = 0.9          # the variant decides how it is used (plain ignores it)
    weight_decay: NonNegative = 0.0

    def check(self, family: str, variant: str) -> None:
        if variant == "nesterov" and self.momentum <= 0:  # else it silently runs plain SGD
            raise OptionError(family, "momentum", "variant 'nesterov' needs momentum > 0",
                              self.momentum)


@register
class SGD(Optimizer):
    family = "sgd"
    variants = ("momentum", "plain", "nesterov")
    Options = SGDOptions

    def make_rule(self) -> SGDRule:
        momentum = 0.0 if self.variant == "plain" else self.opts.momentum
        return SGDRule(momentum, self.variant == "nesterov", self.opts.weight_decay)
