"""K-FAC's Kronecker factors and the eigenbasis preconditioner, as pure functions.

Follows alecwangcq/KFAC-Pytorch (``optimizers/kfac.py``, ``utils/kfac_utils.py``), which
Faghri et al. adapted (fartashf/gvar_code, branch ``ntk``): for a layer with input ``a`` and
per-example output gradient ``g``, ``A = E[ã ãᵀ]`` (ã = a with a 1 appended for the bias)
and ``G = E[g gᵀ]``. Convolutions use the unfolded patches, with the reference's spatial
scaling (patches divided by the number of output positions T; output gradients multiplied
by T), so ``A ⊗ G`` has the same scale as a Linear layer's. The natural gradient of the
``[W|b]`` matrix M solves ``G V A + damping·V = M``, i.e.
``V = Q_g[(Q_gᵀ M Q_a) / (d_g d_aᵀ + damping)]Q_aᵀ``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from study.grads.layer_types import input_factor, output_factor

EIGEN_FLOOR = 1e-10
"""Eigenvalues below this are zeroed, as in the reference (round-off makes them negative)."""


def a_statistic(module: nn.Module, a: torch.Tensor) -> tuple[torch.Tensor, float]:
    """(rows, scale) with A = scale·rowsᵀrows = Σ ã ãᵀ / (B·T²) (T = 1 for a 2-D Linear
    input): the reference divides conv patches by T before the product. The rows ã multiply
    the ``[W|b]`` matrix: (B·T, d_in [+1]), in the (channel, kernel position) order of
    ``weight.view(out, -1)``."""
    patches = input_factor(module, a, ones=module.bias is not None, channels_last=True)
    positions = patches.shape[1]
    return patches.reshape(-1, patches.shape[2]), 1.0 / (a.shape[0] * positions ** 2)


def g_statistic(module: nn.Module, g: torch.Tensor, batch_size: int
                ) -> tuple[torch.Tensor, float]:
    """(rows, scale) with G = scale·rowsᵀrows = T·Σ g_n g_nᵀ / B, for ``g`` the gradient of
    the *mean* loss (so the per-example output gradient is g_n = B·g; the reference scales
    conv output gradients by T). Rows: (B·T, d_out)."""
    grads = output_factor(module, g, channels_last=True)
    return grads.reshape(-1, grads.shape[2]), float(batch_size * grads.shape[1])


def covariance_a(module: nn.Module, a: torch.Tensor) -> torch.Tensor:
    rows, scale = a_statistic(module, a)
    return rows.t() @ rows * scale


def covariance_g(module: nn.Module, g: torch.Tensor, batch_size: int) -> torch.Tensor:
    rows, scale = g_statistic(module, g, batch_size)
    return rows.t() @ rows * scale


def sample_labels(logits: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One label per row drawn from softmax(logits) by inverse CDF: the true Fisher's labels.

    The uniforms come from ``generator`` on its own device, so a CPU generator serves a model
    on any device and the global RNG is never touched.
    """
    probs = torch.softmax(logits.detach(), dim=1)
    u = torch.rand(logits.shape[0], 1, generator=generator, device=generator.device)
    labels = (probs.cumsum(1) < u.to(probs.device)).sum(1)
    return labels.clamp_(max=logits.shape[1] - 1)


def running_average(mean: torch.Tensor | None, statistic: tuple[torch.Tensor, float],
                    decay: float) -> torch.Tensor:
    """m ← decay·m + (1−decay)·scale·rowsᵀrows in place (one fused matmul), starting from
    the identity as the reference does."""
    rows, scale = statistic
    if mean is None:
        mean = torch.eye(rows.shape[1], dtype=rows.dtype, device=rows.device)
    return mean.mul_(decay).addmm_(rows.t(), rows, alpha=(1 - decay) * scale)


@dataclass
class Eigenbasis:
    """One layer's preconditioner: factor eigenvectors and the precomputed reciprocal of
    ``d_g d_aᵀ + damping`` (so a direction costs four matmuls and one multiply)."""

    q_g: torch.Tensor
    q_a: torch.Tensor
    d_g: torch.Tensor
    d_a: torch.Tensor
    scale: torch.Tensor
    has_bias: bool

    @classmethod
    def of(cls, a_factor: torch.Tensor, g_factor: torch.Tensor, damping: float,
           has_bias: bool) -> Eigenbasis:
        d_a, q_a = torch.linalg.eigh(a_factor)
        d_g, q_g = torch.linalg.eigh(g_factor)
        q_a, q_g = q_a.contiguous(), q_g.contiguous()
        d_a = d_a * (d_a > EIGEN_FLOOR)
        d_g = d_g * (d_g > EIGEN_FLOOR)
        scale = torch.outer(d_g, d_a).add_(damping).reciprocal_()
        return cls(q_g, q_a, d_g, d_a, scale, has_bias)

    def rotate(self, weight_grad: torch.Tensor, bias_grad: torch.Tensor | None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """(R, Σ R∘(Q_gᵀ M Q_a)) with R = (Q_gᵀ M Q_a)/(d_g d_aᵀ + damping), M = [W|b].

        The sum is ⟨V, M⟩ (Q_g, Q_a orthogonal), which the KL clip needs before V exists.
        """
        m = weight_grad.reshape(weight_grad.shape[0], -1)
        if self.has_bias:
            m = torch.cat([m, bias_grad.unsqueeze(1)], dim=1)
        rotated = torch.linalg.multi_dot([self.q_g.t(), m, self.q_a])
        scaled = rotated * self.scale
        return scaled, torch.vdot(scaled.reshape(-1), rotated.reshape(-1))

    def unrotate(self, scaled: torch.Tensor, weight_shape: torch.Size
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(V_W, V_b): V = Q_g R Q_aᵀ split into the weight (its shape) and bias parts."""
        v = torch.linalg.multi_dot([self.q_g, scaled, self.q_a.t()])
        if not self.has_bias:
            return v.view(weight_shape), None
        return v[:, :-1].view(weight_shape), v[:, -1]

    def state(self) -> dict[str, torch.Tensor]:
        return {"q_g": self.q_g.clone(), "q_a": self.q_a.clone(), "d_g": self.d_g.clone(),
                "d_a": self.d_a.clone(), "scale": self.scale.clone()}

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor], has_bias: bool) -> Eigenbasis:
        return cls(**{k: v.clone() for k, v in state.items()}, has_bias=has_bias)
