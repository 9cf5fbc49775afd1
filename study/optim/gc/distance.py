"""Squared distances between per-example gradients and rank-1 cluster centers (Faghri et al.,
fartashf/gvar_code, ``gluster/layer.py``), per layer with Kronecker factors (Linear / Conv).

Every such layer's per-example gradient is a sum over positions t of outer products,
``g_i = Σ_t go_it ⊗ a_it`` (Linear: one position; Conv: the unfolded input patches; both
from ``study.grads.layer_types``), where ``a`` is the layer input and ``go`` the gradient of
the example's own loss (not divided by the batch size) at the layer output. The bias is
folded in as an appended constant 1 in ``a``: ``[W | b]``'s gradient is
``Σ_t go_t ⊗ [a_t, 1]`` exactly, so one rank-1 center ``Co ⊗ Ci`` per layer covers weight
and bias together (Faghri's code leaves the bias out).

    ||g_i − Co⊗Ci||² = GG_i + ||Ci||²·||Co||² − 2·CG_ic,
    CG_ic = Σ_t (Ci·a_it)(Co·go_it),        GG_i = Σ_{s,t} (a_is·a_it)(go_is·go_it).

Plans (multiply-adds for B examples, T positions, C centers, input width I, output O):
- ``factored``:    CG by two projections (B·T·C·(I+O)), GG by the T×T Gram form (B·T²·(I+O));
- ``materialize``: per-example gradients (B·T·I·O), then CG (B·I·O·C) and GG (B·I·O);
- ``mixed``:       factored CG, GG from materialized gradients (B·T·C·(I+O) + B·T·I·O).
``choose_plan`` takes the cheapest; Linear layers (T = 1) always end up ``factored``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from study.grads.capture import capture
from study.grads.layer import batch_chunks
from study.grads.layer_types import input_factor, output_factor

PLANS = ("factored", "materialize", "mixed")


@dataclass
class Factors:
    """One layer's per-example factors, channels first as convolutions lay them out (no
    transposed copies): ``a`` (B, I, T) with the bias 1 appended, ``g`` (B, O, T)."""

    a: torch.Tensor
    g: torch.Tensor

    def pooled(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-example factors pooled over positions, the terms center updates average:
        (mean_t a, Σ_t g); exact for Linear, the rank-1 pooling of Faghri's GlusterConv."""
        return self.a.mean(2), self.g.sum(2)


def layer_factors(module: nn.Module, a: torch.Tensor, g: torch.Tensor) -> Factors:
    """Factors of a captured layer (input ``a``, output gradient ``g``)."""
    return Factors(input_factor(module, a, ones=module.bias is not None),
                   output_factor(module, g))


Record = tuple[nn.Module, torch.Tensor, torch.Tensor]


def layer_records(model: nn.Module, loss_fn, x: torch.Tensor, y: torch.Tensor,
                  modules: list[nn.Module]) -> list[Record]:
    """(module, input, output gradient) of every module for a batch: one forward and one
    backward of Σ_i loss_i (per-example losses, so each example's factors belong to its own,
    unscaled loss). The backward asks for the gradients of the layer outputs only, so no
    weight gradient is computed."""
    with capture(model, modules, output_grads=False, keep_outputs=True) as cap, \
            torch.enable_grad():
        losses = loss_fn(model(x), y)
    for rec in cap:
        if rec.calls > 1:
            raise ValueError(f"gc: {rec.module} is called more than once per forward")
    grads = torch.autograd.grad(losses.sum(), [rec.output for rec in cap])
    return [(rec.module, rec.a, g) for rec, g in zip(cap, grads)]


def example_factors(model: nn.Module, loss_fn, x: torch.Tensor, y: torch.Tensor,
                    modules: list[nn.Module]) -> list[Factors]:
    return [layer_factors(*r) for r in layer_records(model, loss_fn, x, y, modules)]


def pooled_factors(records: list[Record]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [layer_factors(*r).pooled() for r in records]


def plan_costs(batch: int, positions: int, d_in: int, d_out: int, centers: int) -> dict:
    b, t, i, o, c = batch, positions, d_in, d_out, centers
    return {"factored": b * t * c * (i + o) + b * t * t * (i + o),
            "materialize": b * t * i * o + b * i * o * (c + 1),
            "mixed": b * t * c * (i + o) + b * t * i * o + b * i * o}


def choose_plan(batch: int, positions: int, d_in: int, d_out: int, centers: int) -> str:
    costs = plan_costs(batch, positions, d_in, d_out, centers)
    return min(PLANS, key=costs.__getitem__)


def sq_distances(f: Factors, ci: torch.Tensor, co: torch.Tensor,
                 plan: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(D, GG): D[i, c] = ||g_i − co_c ⊗ ci_c||² (B, C) and GG[i] = ||g_i||² (B,)."""
    batch, d_in, positions = f.a.shape
    d_out = f.g.shape[1]
    plan = plan or choose_plan(batch, positions, d_in, d_out, ci.shape[0])
    if plan not in PLANS:
        raise ValueError(f"gc: unknown distance plan {plan!r}; choose from {list(PLANS)}")
    cc = (ci * ci).sum(1) * (co * co).sum(1)
    if plan == "factored":
        cg = _factored_cg(f, ci, co)
        if positions == 1:
            gg = (f.a * f.a).sum((1, 2)) * (f.g * f.g).sum((1, 2))
        else:
            gram_a = torch.bmm(f.a.transpose(1, 2), f.a)
            gram_g = torch.bmm(f.g.transpose(1, 2), f.g)
            gg = (gram_a * gram_g).sum((1, 2))
    else:
        cg = _factored_cg(f, ci, co) if plan == "mixed" else None
        gg_parts, cg_parts = [], []
        for part in batch_chunks(batch, d_in * d_out):
            grads = torch.bmm(f.g[part], f.a[part].transpose(1, 2))  # (b, O, I)
            gg_parts.append((grads * grads).sum((1, 2)))
            if cg is None:
                cg_parts.append((torch.matmul(grads, ci.T) * co.T).sum(1))        # (b, C)
        gg = torch.cat(gg_parts)
        cg = cg if cg is not None else torch.cat(cg_parts)
    return gg[:, None] + cc[None, :] - 2 * cg, gg


def _factored_cg(f: Factors, ci: torch.Tensor, co: torch.Tensor) -> torch.Tensor:
    """Σ_t (ci·a_t)(co·g_t), in batch chunks so the (b, T, C) projections stay bounded."""
    batch, positions = f.a.shape[0], f.a.shape[2]
    if positions == 1:   # Linear: two plain GEMMs, not B batched matrix-vector products
        return (f.a[:, :, 0] @ ci.T) * (f.g[:, :, 0] @ co.T)
    return torch.cat([(torch.matmul(ci, f.a[part]) * torch.matmul(co, f.g[part])).sum(2)
                      for part in batch_chunks(batch, positions * ci.shape[0])])


def distances_and_pooled(records: list[Record], ci: list[torch.Tensor] | None,
                         co: list[torch.Tensor] | None):
    """(D, pooled): squared distances to the centers summed over layers, clamped at 0
    against round-off (B, C), and each layer's pooled factors. ``ci = co = None`` measures
    every example against every example's own pooled factors (B, B), for seeding. Unfolded
    factors live one layer at a time."""
    total, pooled = None, []
    for layer, record in enumerate(records):
        f = layer_factors(*record)
        pooled.append(f.pooled())
        i, o = pooled[-1] if ci is None else (ci[layer], co[layer])
        d, _ = sq_distances(f, i, o)
        total = d if total is None else total.add_(d)
        del f
    return total.clamp_(min=0), pooled
