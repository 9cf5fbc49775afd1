"""Update rules: how a direction becomes a parameter change (explicit state, optax style).

Families produce directions; an update rule turns a direction into a step. Keeping the two
apart is what lets K-FAC reuse momentum SGD and lets every family be measured the same way.
The formulas follow ``torch.optim.SGD`` and ``torch.optim.Adam`` exactly (tests compare).
"""
from __future__ import annotations

from typing import Any

import torch


class UpdateRule:
    def apply(self, params: list[torch.Tensor], direction: list[torch.Tensor], lr: float) -> None:
        raise NotImplementedError

    def preview(self, params: list[torch.Tensor], direction: list[torch.Tensor]
                ) -> list[torch.Tensor]:
        """What ``apply`` would subtract per unit of lr (p ← p − lr·preview), from the current
        state, changing nothing: the step direction the variance probe measures."""
        raise NotImplementedError

    def is_identity(self) -> bool:
        """Whether ``preview`` is the direction itself, whatever the state."""
        return False

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class SGDRule(UpdateRule):
    """p ← p − lr·v with v = μ·v + d (+ weight decay); Nesterov uses d + μ·v. Weight decay
    may start late: from step ``decay_after`` on (K-FAC's reference waits 20·t_cov steps)."""

    def __init__(self, momentum: float = 0.0, nesterov: bool = False, weight_decay: float = 0.0,
                 decay_after: int = 0):
        if nesterov and momentum <= 0:
            raise ValueError("nesterov needs momentum > 0")
        self.momentum, self.nesterov, self.weight_decay = momentum, nesterov, weight_decay
        self.decay_after = decay_after
        self.steps = 0
        self.buffers: list[torch.Tensor] | None = None

    def _decayed(self, params, direction):
        if self.weight_decay and self.steps >= self.decay_after:
            return [d + self.weight_decay * p for d, p in zip(direction, params)]
        return direction

    @torch.no_grad()
    def preview(self, params, direction):
        direction = self._decayed(params, direction)
        if not self.momentum:
            return [d.clone() for d in direction]
        velocity = (direction if self.buffers is None else
                    [b * self.momentum + d for b, d in zip(self.buffers, direction)])
        if self.nesterov:
            return [d + self.momentum * v for d, v in zip(direction, velocity)]
        return [v.clone() for v in velocity]

    def is_identity(self) -> bool:
        """Steps along the direction itself (no momentum, no weight decay)."""
        return not self.momentum and not self.weight_decay

    @torch.no_grad()
    def apply(self, params, direction, lr):
        direction = self._decayed(params, direction)
        self.steps += 1
        if self.momentum:
            if self.buffers is None:
                self.buffers = [d.detach().clone() for d in direction]
            else:
                for b, d in zip(self.buffers, direction):
                    b.mul_(self.momentum).add_(d)
            if self.nesterov:
                direction = [d + self.momentum * b for d, b in zip(direction, self.buffers)]
            else:
                direction = self.buffers
        for p, d in zip(params, direction):
            p.add_(d, alpha=-lr)

    def state_dict(self):
        return {"buffers": self.buffers, "steps": self.steps}

    def load_state_dict(self, state):
        self.buffers, self.steps = state["buffers"], state["steps"]


class AdamRule(UpdateRule):
    """Adam (Kingma & Ba), bias-corrected, as in ``torch.optim.Adam``."""

    def __init__(self, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8,
                 weight_decay: float = 0.0):
        self.beta1, self.beta2, self.eps, self.weight_decay = beta1, beta2, eps, weight_decay
        self.t = 0
        self.m: list[torch.Tensor] | None = None
        self.v: list[torch.Tensor] | None = None

    @torch.no_grad()
    def preview(self, params, direction):
        t = self.t + 1
        c1, c2 = 1 - self.beta1 ** t, 1 - self.beta2 ** t
        out = []
        for i, (p, d) in enumerate(zip(params, direction)):
            if self.weight_decay:
                d = d + self.weight_decay * p
            m = d * (1 - self.beta1) if self.m is None else self.m[i].lerp(d, 1 - self.beta1)
            v = (d * d * (1 - self.beta2) if self.v is None else
                 self.v[i] * self.beta2 + d * d * (1 - self.beta2))
            out.append(m / c1 / ((v.sqrt() / c2 ** 0.5).add_(self.eps)))
        return out

    @torch.no_grad()
    def apply(self, params, direction, lr):
        if self.m is None:
            self.m = [torch.zeros_like(p) for p in params]
            self.v = [torch.zeros_like(p) for p in params]
        self.t += 1
        c1, c2 = 1 - self.beta1 ** self.t, 1 - self.beta2 ** self.t
        for p, d, m, v in zip(params, direction, self.m, self.v):
            if self.weight_decay:
                d = d + self.weight_decay * p
            m.lerp_(d, 1 - self.beta1)
            v.mul_(self.beta2).addcmul_(d, d, value=1 - self.beta2)
            denom = (v.sqrt() / c2 ** 0.5).add_(self.eps)
            p.addcdiv_(m, denom, value=-lr / c1)

    def state_dict(self):
        return {"t": self.t, "m": self.m, "v": self.v}

    def load_state_dict(self, state):
        self.t, self.m, self.v = state["t"], state["m"], state["v"]
