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
    if isinstance(module, nn.Linear):
        rows, positions = a.reshape(-1, a.shape[-1]), 1
    else:
        if isinstance(module, nn.Conv1d):
            a = a.unsqueeze(2)
            geometry = [(1, *getattr(module, n)) for n in ("kernel_size", "dilation", "stride")]
            padding = (0, *module.padding)
        else:
            geometry = [module.kernel_size, module.dilation, module.stride]
            padding = module.padding
        cols = F.unfold(a, geometry[0], dilation=geometry[1], padding=padding,
                        stride=geometry[2])                          # (B, d_in, T)
        positions = cols.shape[2]
        rows = cols.transpose(1, 2).reshape(-1, cols.shape[1])
    if module.bias is not None:
        rows = torch.cat([rows, rows.new_ones(rows.shape[0], 1)], dim=1)
    return rows, positions


def covariance_a(module: nn.Module, a: torch.Tensor) -> torch.Tensor:
    """A = Σ ã ãᵀ / (B·T²) (T = 1 for Linear), the reference's input factor."""
    rows, positions = patches(module, a)
    rows = rows / positions
    return rows.t() @ rows / a.shape[0]


def covariance_g(g: torch.Tensor, batch_size: int) -> torch.Tensor:
    """G = T·Σ g_n gᵀ_n / B for ``g`` the gradient of the *mean* loss (so g_n = B·g).

    ``g`` is (B, d_out) for Linear or (B, d_out, *positions) for Conv.
    """
    positions = g[0, 0].numel()
    rows = g.reshape(g.shape[0], g.shape[1], -1).transpose(1, 2).reshape(-1, g.shape[1])
    rows = rows * (batch_size * positions)
    return rows.t() @ rows / (batch_size * positions)


def sample_labels(logits: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One label per row drawn from softmax(logits) by inverse CDF: the true Fisher's labels.

    The uniforms come from ``generator`` on its own device, so a CPU generator serves a model
    on any device and the global RNG is never touched.
    """
    probs = torch.softmax(logits.detach(), dim=1)
    u = torch.rand(logits.shape[0], 1, generator=generator, device=generator.device)
    labels = (probs.cumsum(1) < u.to(probs.device)).sum(1)
    return labels.clamp_(max=logits.shape[1] - 1)


def running_average(mean: torch.Tensor | None, new: torch.Tensor, decay: float) -> torch.Tensor:
    """m ← decay·m + (1−decay)·new, starting from the identity as the reference does."""
    if mean is None:
        mean = torch.eye(new.shape[0], dtype=new.dtype, device=new.device)
    return mean * decay + new * (1 - decay)


@dataclass
class Eigenbasis:
    """One layer's preconditioner: factor eigenvectors and the precomputed reciprocal of
    ``d_g d_aᵀ + damping`` (so a direction costs four matmuls and one multiply).

    ``qa_w``/``qa_b`` are Q_a's weight rows and bias row, so ``[W|b]`` is never concatenated.
    """

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

    def precondition(self, weight_grad: torch.Tensor, bias_grad: torch.Tensor | None
                     ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(V_W, V_b) for the gradient of ``[W|b]`` (weight_grad viewed as (d_out, d_in))."""
        m = weight_grad.reshape(weight_grad.shape[0], -1)
        q_a = self.q_a
        if self.has_bias:
            rotated = torch.addr(m @ q_a[:-1], bias_grad, q_a[-1])   # [W|b] Q_a
        else:
            rotated = m @ q_a
        inner = (self.q_g.t() @ rotated).mul_(self.scale)
        back = self.q_g @ inner                                       # Q_g[...], then ·Q_aᵀ
        v_w = (back @ q_a[:m.shape[1]].t()).view_as(weight_grad)
        v_b = back @ q_a[-1] if self.has_bias else None
        return v_w, v_b

    def state(self) -> dict[str, torch.Tensor]:
        return {"q_g": self.q_g.clone(), "q_a": self.q_a.clone(), "d_g": self.d_g.clone(),
                "d_a": self.d_a.clone(), "scale": self.scale.clone()}

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor], has_bias: bool) -> Eigenbasis:
        return cls(**{k: v.clone() for k, v in state.items()}, has_bias=has_bias)
