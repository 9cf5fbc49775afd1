"""Baseline: Adam (Kingma & Ba 2015) on the mini-batch gradient, as ``torch.optim.Adam``."""
from __future__ import annotations

from study.optim.base import Optimizer
from study.optim.options import FamilyOptions, Fraction, NonNegative, Positive
from study.optim.registry import register
from study.optim.update import AdamRule


class AdamOptions(FamilyOptions):
    beta1: Fraction = 0.9
    beta2: Fraction = 0.999
    eps: Positive = 1e-8
    weight_decay: NonNegative = 0.0


@register
class Adam(Optimizer):
    family = "adam"
    variants = ("adam",)
    Options = AdamOptions

    def make_rule(self) -> AdamRule:
        o = self.opts
        return AdamRule(o.beta1, o.beta2, o.eps, o.weight_decay)
