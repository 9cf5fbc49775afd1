"""K-FAC's Kronecker factors and the eigenbasis preconditioner, as pure functions.

Follows alecwangcq's KFAC-Pytorch, which Faghri et al. adapted (branch ``ntk`` of
gvar_code): for a layer with input ``a`` and per-example output gradient ``g``,
``A = E[ã ãᵀ]`` (ã = a with a 1 appended for the bias) and ``G = E[g gᵀ]``. Convolutions use
the unfolded patches, with the reference's spatial scaling (patches divided by the number of
output positions T; output gradients multiplied by T), so ``A ⊗ G`` has the same scale as a
Linear layer's. The natural gradient of the ``[W|b]`` matrix M solves
``G V A + damping·V = M``, i.e. ``V = Q_g[(Q_gᵀ M Q_a) / (d_g d_aᵀ + damping)]Q_aᵀ``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

EIGEN_FLOOR = 1e-10
"""Eigenvalues below this are zeroed, as in the reference (round-off makes them negative)."""


def kfac_supported(module: nn.Module) -> bool:
    """Linear, and ungrouped zero-padded Conv1d/Conv2d with numeric padding, whose
    parameters all train (other layers keep the plain gradient)."""
    if not all(p.requires_grad for p in module.parameters(recurse=False)):
        return False
    if isinstance(module, nn.Linear):
        return True
    return (isinstance(module, (nn.Conv1d, nn.Conv2d)) and module.groups == 1
            and module.padding_mode == "zeros" and not isinstance(module.padding, str))


def patches(module: nn.Module, a: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The rows ã that multiply the ``[W|b]`` matrix: (B·T, d_in [+1]), and T.

    Linear: T = 1 and the rows are the inputs. Conv: the unfolded receptive fields, in the
    (channel, kernel position) order of ``weight.view(out, -1)``.
    """
    bias = module.bias is not None
    if isinstance(module, nn.Linear):
        a = a.reshape(-1, a.shape[-1])
        rows = torch.cat([a, a.new_ones(a.shape[0], 1)], dim=1) if bias else a
        return rows, 1
    if isinstance(module, nn.Conv1d):
        a = a.unsqueeze(2)
        (kh, kw), (dh, dw), (sh, sw) = [(1, *getattr(module, n))
                                        for n in ("kernel_size", "dilation", "stride")]
        ph, pw = 0, module.padding[0]
    else:
        (kh, kw), (dh, dw), (sh, sw) = module.kernel_size, module.dilation, module.stride
        ph, pw = module.padding
    # Strided windows and one copy (F.unfold's CPU im2col loops over the batch).
    x = F.pad(a, (pw, pw, ph, ph)) if ph or pw else a
    windows = x.unfold(2, dh * (kh - 1) + 1, sh).unfold(3, dw * (kw - 1) + 1, sw)
    windows = windows[..., ::dh, ::dw].permute(0, 2, 3, 1, 4, 5)    # (B, Ho, Wo, C, kh, kw)
    batch, height, width, d_in = *windows.shape[:3], math.prod(windows.shape[3:])
    rows = a.new_empty(batch, height, width, d_in + bias)
    rows[..., :d_in].view(windows.shape).copy_(windows)
    if bias:
        rows[..., d_in] = 1
    return rows.view(-1, d_in + bias), height * width


def a_statistic(module: nn.Module, a: torch.Tensor) -> tuple[torch.Tensor, float]:
    """(rows, scale) with A = scale·rowsᵀrows = Σ ã ãᵀ / (B·T²) (T = 1 for Linear): the
    reference divides conv patches by T before the product."""
    rows, positions = patches(module, a)
    return rows, 1.0 / (a.shape[0] * positions ** 2)


def g_statistic(g: torch.Tensor, batch_size: int) -> tuple[torch.Tensor, float]:
    """(rows, scale) with G = scale·rowsᵀrows = T·Σ g_n g_nᵀ / B, for ``g`` the gradient of
    the *mean* loss (so the per-example output gradient is g_n = B·g; the reference scales
    conv output gradients by T). ``g`` is (B, d_out) or (B, d_out, *positions)."""
    if g.dim() == 2:
        return g, float(batch_size)
    positions = g[0, 0].numel()
    rows = g.reshape(g.shape[0], g.shape[1], -1).transpose(1, 2).reshape(-1, g.shape[1])
    return rows, float(batch_size * positions)


def covariance_a(module: nn.Module, a: torch.Tensor) -> torch.Tensor:
    rows, scale = a_statistic(module, a)
    return rows.t() @ rows * scale


def covariance_g(g: torch.Tensor, batch_size: int) -> torch.Tensor:
    rows, scale = g_statistic(g, batch_size)
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

    def precondition(self, weight_grad: torch.Tensor, bias_grad: torch.Tensor | None
                     ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(V_W, V_b) for the gradient of ``[W|b]``, without the KL clip."""
        return self.unrotate(self.rotate(weight_grad, bias_grad)[0], weight_grad.shape)

    def state(self) -> dict[str, torch.Tensor]:
        return {"q_g": self.q_g.clone(), "q_a": self.q_a.clone(), "d_g": self.d_g.clone(),
                "d_a": self.d_a.clone(), "scale": self.scale.clone()}

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor], has_bias: bool) -> Eigenbasis:
        return cls(**{k: v.clone() for k, v in state.items()}, has_bias=has_bias)
