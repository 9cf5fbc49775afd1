"""Gradient Clustering (GC, "Gluster"; Faghri et al. 2020): stratified sampling over clusters
of per-example gradients, with importance weights that keep the estimate unbiased.

Clusters live in gradient space with one rank-1 center ``Co ⊗ Ci`` per Linear/Conv layer
(``distance.py``); other layers' parameters are not clustered. Assignment minimizes the
*weighted* cost ``(N_k + 1)·||g_i − c_k||²`` (Faghri's default ``mul_Nk``): the variance of
the stratified estimator is ``(1/N²) Σ_k N_k Σ_{i∈k} ||g_i − c_k||²``. In full passes N_k is
the running count of the pass (updated every max(``ASSIGN_STEP``, N/(4·C)) examples); in
online EM steps it is the EMA size, which starts at the fair share B/C. Centers are the cluster
means of the factors (``Factors.pooled``).

Variants
- ``batch``: every ``snapshot_every`` epochs, ``citers`` passes over the training set
  (assign every example; if the smallest cluster has fewer than ``min_size`` members, a
  random half of the highest-distortion cluster moves into it; recompute centers). Cost N
  per pass plus the examples moved (their factors are recomputed).
- ``online``: every ``online_every`` iterations one EM step on a random mini-batch (assign,
  sizes ``N_k ← β·N_k + (1−β)·counts`` in examples-per-batch units, size-weighted center
  blend); every ``reinit_every`` iterations the smallest cluster with ``N_k/B < min_size/C``
  becomes a copy of the highest-distortion cluster (both take half its size). Every
  ``snapshot_every`` epochs one assignment pass (cost N) gives the sampler its strata.

Centers start from k-means++ seeding on a random pool of max(4·C, B) examples (cost: the
pool), so a center starts as a real example's (pooled) factors; Faghri seeds randomly.

Why assignments change only at epoch ends: the trial builds an epoch's sampler before that
epoch's first step, and ``direction`` weights a batch by the assignment the sampler drew it
with. So the stratification switches only between epochs; the first epoch (until the first
snapshot at the end of epoch ``snapshot_every``) is uniform sampling with unit weights.
"""
from __future__ import annotations

import math
from typing import Any

import torch

from study.data import Batch, UniformSampler
from study.grads.layer_types import (
    Requirements,
    kronecker_layers,
    kronecker_type_names,
    unsupported,
)
from study.optim.base import Context, Direction, Optimizer, Periodic, gradient
from study.optim.gc.distance import Record, distances_and_pooled, layer_records, pooled_factors
from study.optim.gc.stratified import StratifiedSampler, cluster_counts, importance_weights
from study.optim.options import Count, Fraction, NonNegative, NonNegativeCount, StepOptions
from study.optim.registry import register

NEEDS = Requirements(ungrouped=True)
"""One rank-1 center per layer covers one ``[W|b]`` matrix, so no grouped convolutions."""

CLUSTER_PASS_BATCH = 512
"""Examples per chunk in clustering passes (memory bound, not semantics)."""

ASSIGN_STEP = 16
"""Fewest examples assigned between updates of the running cluster sizes in a full pass;
the step grows to N/(4·C), so a pass takes O(C) small steps, not O(N)."""


def kmeans_pp(dist: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """k-means++ seeding: ``dist[i, j]`` is the squared distance of candidate i to candidate
    j's center; each pick is drawn with probability ∝ distance to the nearest pick."""
    dist = dist.detach().to("cpu", torch.float64)
    chosen = [int(torch.randint(dist.shape[0], (1,), generator=generator))]
    nearest = dist[:, chosen[0]].clone()
    for _ in range(k - 1):
        w = nearest.clamp(min=0)
        w = w if w.sum() > 0 else torch.ones_like(w)
        chosen.append(int(torch.multinomial(w, 1, generator=generator)))
        nearest = torch.minimum(nearest, dist[:, chosen[-1]])
    return torch.tensor(chosen)


class GCOptions(StepOptions):
    nclusters: Count = 10
    citers: Count = 3                 # batch: assignment passes per snapshot
    snapshot_every: Count = 1         # epochs between snapshots
    online_every: Count = 10          # online: iterations between EM steps
    beta: Fraction = 0.99             # online: EMA of the cluster sizes
    reinit_every: NonNegativeCount = 50   # online: iterations between re-inits (0 = never)
    min_size: NonNegative = 1.0       # smallest cluster, in examples (batch) / fair shares


@register
class GC(Optimizer):
    family = "gc"
    variants = ("online", "batch")
    Options = GCOptions

    def __init__(self, model, loss_fn, lr, variant=None, **options):
        super().__init__(model, loss_fn, lr, variant, **options)
        self.nclusters = self.opts.nclusters
        self.modules = kronecker_layers(model)
        if not self.modules:
            raise ValueError(f"gc: the model has no {kronecker_type_names()} layer to cluster")
        for m in self.modules:
            if unsupported(m, NEEDS) is not None:
                raise ValueError(f"gc: {m} needs groups=1 and numeric zero padding")
        dev = self.params[0].device
        self.ci: list[torch.Tensor] | None = None   # per layer (C, I): input factors
        self.co: list[torch.Tensor] | None = None   # per layer (C, O): output factors
        self.sizes = torch.zeros(self.nclusters, dtype=torch.float64, device=dev)
        self.distortion = torch.zeros(self.nclusters, dtype=torch.float64, device=dev)
        self.assignment: torch.Tensor | None = None  # (N,) cluster of each example
        self.counts: torch.Tensor | None = None      # (C,) members per cluster
        self.total_distortion = math.nan
        self.reinits = 0

    # -- schedule -----------------------------------------------------------------------------
    def periodic(self) -> list[Periodic]:
        o = self.opts
        if self.variant == "batch":
            return [Periodic("dataset", o.snapshot_every, "epoch", self.batch_snapshot)]
        work = [Periodic("minibatch", o.online_every, "iter", self.em_step),
                Periodic("dataset", o.snapshot_every, "epoch", self.assignment_snapshot)]
        if o.reinit_every:
            work.insert(1, Periodic("minibatch", o.reinit_every, "iter", self.reinit))
        return work

    # -- the estimator ------------------------------------------------------------------------
    def direction(self, batch: Batch) -> Direction:
        weights = None
        if self.assignment is not None:
            weights = importance_weights(self.assignment, self.counts, batch.idx)
            weights = weights.to(self.params[0].dtype)
        grads, loss = gradient(self.model, self.loss_fn, batch, self.params, weights)
        return Direction(grads, loss, grad_evals=len(batch))

    def sampler(self, n: int, batch_size: int, generator: torch.Generator):
        if self.assignment is None:
            return UniformSampler(n, batch_size, generator)
        if self.assignment.numel() != n:
            raise ValueError(f"gc: the assignment covers {self.assignment.numel()} examples, "
                             f"the sampler was asked for {n}")
        return StratifiedSampler(self.assignment, batch_size, generator)

    def metrics(self) -> dict[str, float]:
        """``gc/total_distortion``: Σ_i ||g_i − c_k(i)||² over the training set in the last
        full pass (unweighted, to the centers that pass assigned with; NaN before it);
        ``gc/nonempty_clusters``: M of the live assignment; ``gc/reinits``: rebalancing
        moves (batch) or re-seeded clusters (online) so far."""
        nonempty = 0 if self.counts is None else int((self.counts > 0).sum())
        return {"gc/total_distortion": self.total_distortion,
                "gc/nonempty_clusters": float(nonempty), "gc/reinits": float(self.reinits)}

    # -- clustering ---------------------------------------------------------------------------
    def _records(self, batch: Batch) -> list[Record]:
        return layer_records(self.model, self.loss_fn, batch.x, batch.y, self.modules)

    def _assign(self, records: list[Record], sizes: torch.Tensor, step: int | None = None):
        """Weighted assignment argmin_k (N_k + 1)·d_ik, each example's (unweighted) squared
        distance, and the pooled factors. With a ``step``, ``sizes`` are the counts so far
        in a pass and grow every ``step`` examples (Faghri's batch pass accumulates them
        too): weighting a whole pass by the previous pass's sizes moves whole clusters
        into the emptiest one at once and oscillates (``tests/test_gc.py``,
        ``test_full_passes_keep_every_cluster_in_use``)."""
        dist, pooled = distances_and_pooled(records, self.ci, self.co)
        running = step is not None
        step = step or dist.shape[0]
        choice = torch.empty(dist.shape[0], dtype=torch.long, device=dist.device)
        for start in range(0, dist.shape[0], step):
            part = (dist[start:start + step] * (sizes + 1).to(dist.dtype)[None]).argmin(1)
            choice[start:start + step] = part
            if running:
                sizes += cluster_counts(part, self.nclusters)
        return choice, dist.gather(1, choice[:, None]).squeeze(1).double(), pooled

    def init_centers(self, ctx: Context) -> int:
        """k-means++ seeding on a random pool; returns the pool size (its cost)."""
        n = len(ctx.train)
        pool = torch.randperm(n, generator=ctx.generator)[:min(n, max(4 * self.nclusters,
                                                                      ctx.batch_size))]
        dist, pooled = distances_and_pooled(self._records(ctx.train.batch(pool)), None, None)
        chosen = kmeans_pp(dist, self.nclusters, ctx.generator).to(dist.device)
        self.ci = [p[0][chosen].clone() for p in pooled]
        self.co = [p[1][chosen].clone() for p in pooled]
        return len(pool)

    def _pass(self, ctx: Context, accumulate: bool):
        """Assign every training example; optionally sum its pooled factors per cluster."""
        c, n = self.nclusters, len(ctx.train)
        running = torch.zeros_like(self.sizes)
        step = max(ASSIGN_STEP, n // (4 * c))
        assignment = torch.empty(n, dtype=torch.long, device=self.sizes.device)
        distortion = torch.zeros_like(self.distortion)
        sums = [(torch.zeros_like(i), torch.zeros_like(o)) for i, o in zip(self.ci, self.co)]
        for batch in ctx.train.batches(max(CLUSTER_PASS_BATCH, ctx.batch_size)):
            choice, dist, pooled = self._assign(self._records(batch), running, step)
            assignment[batch.idx] = choice
            distortion.index_add_(0, choice, dist)
            if accumulate:
                _accumulate(sums, pooled, choice)
        return assignment, distortion, sums, cluster_counts(assignment, c)

    def _publish(self, assignment, counts, distortion) -> None:
        self.assignment, self.counts, self.distortion = assignment, counts, distortion
        self.total_distortion = float(distortion.sum())

    def batch_snapshot(self, ctx: Context) -> int:
        """``citers`` assign/rebalance/update passes; the last assignment feeds the sampler."""
        cost = self.init_centers(ctx) if self.ci is None else 0
        for _ in range(self.opts.citers):
            assignment, distortion, sums, counts = self._pass(ctx, accumulate=True)
            cost += len(ctx.train) + self._rebalance(ctx, assignment, counts, distortion, sums)
            counts = cluster_counts(assignment, self.nclusters)
            filled = counts > 0
            for (si, so), ci, co in zip(sums, self.ci, self.co):
                ci[filled] = si[filled] / counts[filled, None].to(si.dtype)
                co[filled] = so[filled] / counts[filled, None].to(so.dtype)
        self.sizes = counts.double()
        self._publish(assignment, counts, distortion)
        return cost

    def _rebalance(self, ctx, assignment, counts, distortion, sums) -> int:
        """Move a random half of the highest-distortion cluster into the smallest one if it
        has fewer than ``min_size`` members; returns the examples re-run for their factors."""
        small = int(counts.argmin())
        min_size = self.opts.min_size
        if counts[small] >= min_size:
            return 0
        candidates = distortion.masked_fill(counts < max(min_size, 2), -math.inf)
        big = int(candidates.argmax())
        if candidates[big] == -math.inf:
            return 0
        members = torch.nonzero(assignment == big).squeeze(1)
        half = torch.randperm(members.numel(), generator=ctx.generator)[:members.numel() // 2]
        moved = members[half.to(members.device)]
        assignment[moved] = small
        for batch in _batches_of(ctx.train, moved, max(CLUSTER_PASS_BATCH, ctx.batch_size)):
            for (si, so), (a, g) in zip(sums, pooled_factors(self._records(batch))):
                si[big] -= a.sum(0)
                si[small] += a.sum(0)
                so[big] -= g.sum(0)
                so[small] += g.sum(0)
        self.reinits += 1
        return moved.numel()

    def assignment_snapshot(self, ctx: Context) -> int:
        """Online variant: assign every example to the current centers (cost N)."""
        cost = self._ensure_online_init(ctx)
        assignment, distortion, _, counts = self._pass(ctx, accumulate=False)
        self._publish(assignment, counts, distortion)
        return cost + len(ctx.train)

    def _ensure_online_init(self, ctx: Context) -> int:
        if self.ci is not None:
            return 0
        cost = self.init_centers(ctx)
        self.sizes = torch.full_like(self.sizes, ctx.batch_size / self.nclusters)
        return cost

    def em_step(self, ctx: Context) -> int:
        """One online EM step on a random mini-batch drawn with ``ctx.generator``."""
        cost = self._ensure_online_init(ctx)
        n, beta = len(ctx.train), self.opts.beta
        idx = torch.randperm(n, generator=ctx.generator)[:ctx.batch_size]
        choice, dist, pooled = self._assign(self._records(ctx.train.batch(idx)), self.sizes)
        counts = cluster_counts(choice, self.nclusters).double()
        post = (1 - beta) * counts
        new = beta * self.sizes + post
        pre = new - post
        ratio = post / counts.clamp(min=1)
        sums = [(torch.zeros_like(i), torch.zeros_like(o)) for i, o in zip(self.ci, self.co)]
        _accumulate(sums, pooled, choice)
        keep = new > 0
        for (si, so), ci, co in zip(sums, self.ci, self.co):
            for center, s in ((ci, si), (co, so)):
                w_old, w_new, total = (t[keep, None].to(center.dtype) for t in (pre, ratio, new))
                center[keep] = (w_old * center[keep] + w_new * s[keep]) / total
        batch_dist = torch.zeros_like(self.distortion).index_add_(0, choice, dist)
        self.distortion = beta * self.distortion + (1 - beta) * batch_dist
        self.sizes = new
        return cost + len(idx)

    def reinit(self, ctx: Context) -> int:
        """Online: re-seed the smallest under-sized cluster from the highest-distortion one."""
        if self.ci is None:
            return 0
        small = self.sizes / ctx.batch_size < self.opts.min_size / self.nclusters
        candidates = self.distortion.masked_fill(small, -math.inf)
        if not small.any() or candidates.max() == -math.inf:
            return 0
        ri = int(self.sizes.masked_fill(~small, math.inf).argmin())
        li = int(candidates.argmax())
        for centers in (*self.ci, *self.co):
            centers[ri] = centers[li]
        for stat in (self.sizes, self.distortion):
            stat[li] /= 2
            stat[ri] = stat[li]
        self.reinits += 1
        return 0

    # -- checkpoints --------------------------------------------------------------------------
    _STATE = ("ci", "co", "sizes", "distortion", "assignment", "counts")

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["gc"] = {k: getattr(self, k) for k in self._STATE}
        state["gc"].update(total_distortion=self.total_distortion, reinits=self.reinits)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        gc = state["gc"]
        for k in self._STATE:
            v = gc[k]
            v = [t.clone() for t in v] if isinstance(v, list) else v
            setattr(self, k, v.clone() if isinstance(v, torch.Tensor) else v)
        self.total_distortion, self.reinits = gc["total_distortion"], gc["reinits"]


def _accumulate(sums, pooled, choice: torch.Tensor) -> None:
    """Add each example's pooled factors to its cluster's running sums."""
    for (si, so), (a, g) in zip(sums, pooled):
        si.index_add_(0, choice, a)
        so.index_add_(0, choice, g)


def _batches_of(split, idx: torch.Tensor, chunk: int):
    for start in range(0, idx.numel(), chunk):
        yield split.batch(idx[start:start + chunk])
