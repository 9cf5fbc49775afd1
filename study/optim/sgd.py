"""Baselines: SGD (plain, heavy-ball momentum, Nesterov) and Adam on the mini-batch gradient."""
from __future__ import annotations

from study.optim.base import Optimizer
from study.optim.registry import register


@register
class SGD(Optimizer):
    family = "sgd"
    variants = ("momentum", "plain", "nesterov")
    options = {"momentum": 0.9, "weight_decay": 0.0}

    def __init__(self, model, loss_fn, lr, variant=None, **options):
        super().__init__(model, loss_fn, lr, variant, **options)
        # The variant decides how momentum is used; the option only sets its size.
        self.rule.momentum = 0.0 if self.variant == "plain" else float(self.opts["momentum"])
        self.rule.nesterov = self.variant == "nesterov"
        if self.rule.nesterov and self.rule.momentum <= 0:  # else it silently runs plain SGD
            raise ValueError(f"sgd: variant 'nesterov' needs option momentum > 0, "
                             f"got {self.rule.momentum}")


@register
class Adam(Optimizer):
    family = "adam"
    variants = ("adam",)
    options = {"beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.0}
    default_rule = "adam"
