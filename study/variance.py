"""Gradient-variance measurement on the probe's own batches (Faghri et al.'s ``get_Ege_var``
and ``log_var``), the gradient noise scale (McCandlish et al. 2018) and |gradient| histograms.

Why a probe of its own: the statistics must describe the trajectory training takes without
changing it. Every batch comes from generators seeded by (seed, iteration, stream >= 1)
(training draws from stream 0, scheduled work from its own stream), the global torch RNG is
saved and restored around each measurement (dropout in train mode would otherwise shift
training's randomness), the optimizer is only asked for ``direction`` and
``update_direction`` (pure, never ``step``) and nothing is written to ``p.grad``.

Which examples, with n = ``measure.batches``, B the trial's batch size and M the training
set's size:

- the MEAN set: n batches of a uniform without-replacement sampler (consecutive epochs when
  n·B > M), from a stream of its own (``MEAN_STREAM``);
- the FRESH set: N = n·B DISTINCT examples, one without-replacement draw of the training set
  split into n batches (``FRESH_STREAM``, independent of the mean set, so ``Ege`` is
  independent of the fresh gradients); when N > M it cannot be distinct and is N i.i.d.
  draws with replacement instead;
- a family that samples its own way (GC's strata) has its directions measured on 2n
  consecutive batches of ITS sampler (``OWN_SAMPLER_STREAM``: n for its ``Ege``, n fresh):
  GC's importance weights are unbiased only on its stratified batches. The plain-gradient
  statistics and the noise scale always use the uniform mean and fresh sets above.

Estimates, with nw = number of parameters (gvar_code ``estim/gestim.py``):

- ``Ege`` = mean of n directions on the mean set; then on the n fresh batches g_1..g_n:
  ``var`` = Σ_i ||g_i − Ege||² / n / nw, ``nvar`` = mean_j D_j / (S_j + 1e-7),
  ``logsnr`` = mean_j [log(S_j + 1e-10) − log(D_j + 1e-10)], ``gnorm`` = Σ_j S_j / n / nw,
  where S_j = Σ_i g_ij² and D_j = Σ_i (g_ij − Ege_j)² (the epsilons are gvar_code's).
- both for the update the trial applies (``dir_*``: ``opt.update_direction`` of its
  direction, i.e. through momentum, Adam's moments, a well-tempered window; gvar_code's
  ``estim/heavyball.py``, ``estim/adam.py``) and for the plain mini-batch gradient at the
  same weights on the same batches (``sgd_*``; common batches make ``bias`` =
  mean_j |Ege_dir − Ege_sgd| exactly 0 for a family that steps along the gradient);
- and for each shadow estimator (``study.shadows``) its direction on 2n batches of its own
  sampler at its own batch size (``<name>_*``).
- B_simple = tr(Σ) / |G|² from the per-example gradients of the fresh set, with the
  finite-population correction (``study.noise_scale``).

When: ``measure.points`` measurements per trial, spread over its iterations (``spacing:
linear`` = evenly, the same fractions of training at every batch size; ``log`` = denser
early, like the histograms' ``log_spaced_iterations``), or, as the alternative,
``measure.every`` iterations (a batch-512 trial then gets 16× fewer than a batch-32 one).
Either schedule is a pure function of the trial's total iterations, so a resumed trial
measures exactly where an uninterrupted one would.

Cost per measurement: the mean set's plain gradient in union passes (one backward per
⌊1024/B⌋ batches), one ``batch_stats`` backward per fresh batch (it yields both the
mini-batch gradient and the per-example sums), and 2n ``direction`` calls. A family whose
``direction`` is the base class's (the plain gradient: sgd, adam) skips those: its ``dir_*``
statistics reuse the gradient computations.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from study import contract as C
from study.data import Batch, DataSplit, UniformSampler, epoch_generator
from study.grads import batch_stats
from study.histograms import histogram_edges, log10_span, magnitude_histograms  # noqa: F401
from study.noise_scale import noise_scale
from study.optim.base import Optimizer, gradient
from study.shadows import EstimatorSettings, Shadow

MEAN_STREAM = 1         # the mean set (n batches of a uniform sampler)
HISTOGRAM_STREAM = 2    # the probe batch of a histogram
OWN_SAMPLER_STREAM = 3  # a family's own sampler: its mean and fresh direction batches (2n)
FRESH_STREAM = 4        # the fresh set (n·B distinct examples; i.i.d. when n·B > M)
SHADOW_PROBE_STREAM = 10  # + i: the i-th shadow estimator's measurement batches
SPACINGS = ("linear", "log")
DEFAULT_POINTS = 8      # measurements per trial when neither points nor every is set
UNION_EXAMPLES = 1024  # memory bound of the mean set's union passes (examples per pass)
NVAR_EPS, SNR_EPS = 1e-7, 1e-10


@dataclass(frozen=True)
class ProbeSettings:
    """When and how much the probe measures (the spec's ``measure:`` checks the values)."""

    every: int | None = None          # iterations between measurements; 0 = off
    batches: int = 5                  # mini-batches per estimate (Faghri's gviter)
    start: int = 0                    # first iteration measured
    histograms: bool = True           # per-layer |gradient| histograms
    histogram_points: int = 8         # log-spaced iterations with a histogram
    points: int | None = None         # measurements per trial (exclusive with every); 0 = off
    spacing: str = "linear"           # how points spread over the trial: linear | log
    estimators: tuple[EstimatorSettings, ...] = ()   # shadow estimators (study.shadows)

    def __post_init__(self):
        if self.every is not None and self.points is not None:
            raise ValueError(f"measure.points: set points ({self.points}) or every "
                             f"({self.every}), not both")
        if self.every is None and self.points is None:
            object.__setattr__(self, "points", DEFAULT_POINTS)
        if self.spacing not in SPACINGS:
            raise ValueError(f"measure.spacing: {self.spacing!r} is not one of {list(SPACINGS)}")

    @property
    def measures(self) -> bool:
        """Whether any variance measurement is scheduled."""
        return bool(self.points or self.every)


class VarianceProbe:
    """Measures the variance of an optimizer's step direction on batches of its own.

    Call ``measure`` / ``record_histogram`` after the iteration's periodic work and before
    its step: a direction may need that work (SVRG's iteration-0 snapshot)."""

    def __init__(self, measure: ProbeSettings, train: DataSplit, batch_size: int, seed: int,
                 total_iterations: int):
        if batch_size < 1 or batch_size > len(train):
            raise ValueError(f"batch_size: {batch_size} must be in [1, {len(train)}] "
                             "(the training set's size)")
        if total_iterations < 1:
            raise ValueError(f"total_iterations: {total_iterations} must be >= 1")
        if measure.measures and measure.batches * batch_size < 2:
            raise ValueError("measure.batches: the noise scale needs at least 2 examples "
                             f"(batches × batch_size = {measure.batches * batch_size})")
        self.settings, self.train, self.batch_size, self.seed = measure, train, batch_size, seed
        self.total_iterations = total_iterations
        self.histogram_iterations = (log_spaced_iterations(total_iterations,
                                                           measure.histogram_points)
                                     if measure.histograms else [])
        self.measure_iterations = (
            None if not measure.points else
            measurement_iterations(total_iterations, measure.points, measure.spacing,
                                   measure.start))
        self._hist: dict[str, list[dict[str, Any]]] = {}
        self._hist_done: list[int] = []

    # -- schedule ---------------------------------------------------------------------------
    def due(self, iteration: int) -> bool:
        if self.measure_iterations is not None:
            return iteration in self.measure_iterations
        every, start = self.settings.every, self.settings.start
        return bool(every) and iteration >= start and (iteration - start) % every == 0

    def histogram_due(self, iteration: int) -> bool:
        return iteration in self.histogram_iterations and iteration not in self._hist_done

    # -- batches ----------------------------------------------------------------------------
    def batches(self, iteration: int, stream: int, count: int, sampler=UniformSampler,
                batch_size: int | None = None) -> list[Batch]:
        """``count`` batches (of the trial's batch size unless given) of the probe's stream at
        ``iteration``: consecutive epochs of ``sampler`` (uniform without replacement, as
        training samples by default), continued when one runs out."""
        generator = epoch_generator(self.seed, iteration, stream)
        out: list[Batch] = []
        while len(out) < count:
            for idx in sampler(len(self.train), batch_size or self.batch_size, generator):
                out.append(self.train.batch(idx))
                if len(out) == count:
                    break
        return out

    def fresh_batches(self, iteration: int) -> list[Batch]:
        """The fresh set: N = n·B distinct examples (one without-replacement draw of the
        training set, split into n batches); N i.i.d. draws when N exceeds the set."""
        n, size, total = self.settings.batches, self.batch_size, len(self.train)
        generator = epoch_generator(self.seed, iteration, FRESH_STREAM)
        if self.fresh_with_replacement:
            idx = torch.randint(total, (n * size,), generator=generator)
        else:
            idx = torch.randperm(total, generator=generator)[:n * size]
        return [self.train.batch(idx[i * size:(i + 1) * size]) for i in range(n)]

    @property
    def fresh_with_replacement(self) -> bool:
        return self.settings.batches * self.batch_size > len(self.train)

    def estimate_batches(self, iteration: int, sampler=None, stream=OWN_SAMPLER_STREAM
                         ) -> tuple[list[Batch], list[Batch]]:
        """(mean set, fresh set) of ``measure.batches`` batches each: by default the uniform
        mean set and the distinct fresh set (module docstring); with ``sampler``, 2n
        consecutive batches of that sampler on ``stream`` (a family's own sampling)."""
        n = self.settings.batches
        if sampler is None:
            return self.batches(iteration, MEAN_STREAM, n), self.fresh_batches(iteration)
        both = self.batches(iteration, stream, 2 * n, sampler)
        return both[:n], both[n:]

    # -- measurement ------------------------------------------------------------------------
    def measure(self, opt: Optimizer, iteration: int, shadows: Sequence[Shadow] = ()
                ) -> dict[str, float]:
        """The ``var/*`` metrics at the current weights (see the module docstring), with
        ``var/<name>_*`` for each shadow estimator."""
        mean_set, fresh_set = self.estimate_batches(iteration)
        plain = type(opt).direction is Optimizer.direction and opt.steps_along_direction()

        def step_of(batch: Batch) -> torch.Tensor:   # the update the rule would apply
            return _flat(opt.update_direction(opt.direction(batch)), acc)
        # A family's direction is measured on the batches its own sampler draws (GC's
        # importance weights are unbiased only on its stratified batches).
        dir_mean_set, dir_fresh_set = mean_set, fresh_set
        if type(opt).sampler is not Optimizer.sampler:
            dir_mean_set, dir_fresh_set = self.estimate_batches(iteration, opt.sampler)
        model, loss_fn, params = opt.model, opt.loss_fn, opt.params
        with _isolated():
            acc = _acc_dtype(params[0])
            sgd_mean = _union_gradient(model, loss_fn, mean_set, params, acc)
            sgd = _Moments(sgd_mean)
            if plain:
                dir_ = sgd
            else:
                dir_ = _Moments(_mean_of(step_of(b) for b in dir_mean_set))
            ex_sum = torch.zeros_like(sgd_mean)
            ex_sq = torch.zeros((), dtype=acc, device=sgd_mean.device)
            n_examples = 0
            for b, d in zip(fresh_set, dir_fresh_set):
                st = batch_stats(model, loss_fn, b, params, second_moment=False)
                total = _flat(st.sum, acc)
                ex_sum += total
                ex_sq += st.norms_sq.to(acc).sum()
                n_examples += st.n
                sgd.add(total / st.n)
                if not plain:
                    dir_.add(step_of(d))
            out = {**dir_.summary(C.DIRECTION), **sgd.summary(C.SGD_GRADIENT),
                   C.VAR_BIAS: (dir_.mean - sgd.mean).abs().mean(),
                   **noise_scale(ex_sum, ex_sq, n_examples,
                                  None if self.fresh_with_replacement else len(self.train))}
            for index, shadow in enumerate(shadows):
                out.update(self._shadow_moments(shadow, index, iteration, acc)
                           .summary(shadow.name))
            values = torch.stack([torch.as_tensor(v, dtype=acc, device=sgd_mean.device)
                                  for v in out.values()]).tolist()   # one device sync
        return dict(zip(out, values))

    def _shadow_moments(self, shadow: Shadow, index: int, iteration: int, acc: torch.dtype
                        ) -> _Moments:
        """A shadow's directions on 2n consecutive batches of its own sampler at its own batch
        size (n for its Ege, n fresh), on a stream of its own."""
        n, opt = self.settings.batches, shadow.opt
        both = self.batches(iteration, SHADOW_PROBE_STREAM + index, 2 * n, opt.sampler,
                            shadow.batch_size)
        moments = _Moments(_mean_of(_flat(opt.direction(b).tensors, acc) for b in both[:n]))
        for b in both[n:]:
            moments.add(_flat(opt.direction(b).tensors, acc))
        return moments

    # -- histograms -------------------------------------------------------------------------
    def record_histogram(self, opt: Optimizer, iteration: int) -> dict[str, float]:
        """Histograms of |entries| of a plain mini-batch gradient, one per parameter; returns
        the decades the entries span (``contract.GRAD_LOG10_SPAN``) as a metric to log."""
        (batch,) = self.batches(iteration, HISTOGRAM_STREAM, 1)
        names = _param_names(opt)
        with _isolated():
            grads, _ = gradient(opt.model, opt.loss_fn, batch, opt.params)
            for name, hist in zip(names, magnitude_histograms(grads)):
                self._hist.setdefault(name, []).append({"iteration": iteration, **hist})
        self._hist_done.append(iteration)
        return {C.GRAD_LOG10_SPAN: log10_span(grads)}

    def histograms(self) -> dict[str, Any]:
        """The ``contract.GRAD_HIST`` artifact's structure (read by analysis.figures)."""
        return {"iterations": list(self._hist_done),
                "layers": {k: [dict(e) for e in v] for k, v in self._hist.items()}}

    def state_dict(self) -> dict[str, Any]:
        return self.histograms()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._hist_done = list(state["iterations"])
        self._hist = {k: [dict(e) for e in v] for k, v in state["layers"].items()}


# -- pieces ---------------------------------------------------------------------------------

class _Moments:
    """Σ_i g_i² and Σ_i (g_i − Ege)² over the fresh set, as flat tensors (no per-coordinate
    loop: one vector op per batch)."""

    def __init__(self, mean: torch.Tensor):
        self.mean = mean
        self.sq = torch.zeros_like(mean)
        self.dev = torch.zeros_like(mean)
        self.count = 0

    def add(self, g: torch.Tensor) -> None:
        self.sq.addcmul_(g, g)
        d = g - self.mean
        self.dev.addcmul_(d, d)
        self.count += 1

    def summary(self, prefix: str) -> dict[str, torch.Tensor]:
        nw, n = self.mean.numel(), self.count
        return {C.variance_key(prefix, "var"): self.dev.sum() / n / nw,
                C.variance_key(prefix, "nvar"): (self.dev / (self.sq + NVAR_EPS)).mean(),
                C.variance_key(prefix, "logsnr"): ((self.sq + SNR_EPS).log()
                                         - (self.dev + SNR_EPS).log()).mean(),
                C.variance_key(prefix, "gnorm"): self.sq.sum() / n / nw}


def measurement_iterations(total: int, points: int, spacing: str = "linear", start: int = 0
                           ) -> list[int]:
    """The iterations of ``points`` measurements in [start, total): linearly or log-spaced,
    the first at ``start`` and the last at total − 1 (fewer when rounding merges neighbours
    in a short trial; none when start >= total). A pure function of its arguments: a resumed
    trial measures where an uninterrupted one would."""
    span = total - start
    if points < 1 or span < 1:
        return []
    spaced = (linear_spaced_iterations if spacing == "linear" else log_spaced_iterations)
    return [start + i for i in spaced(span, points)]


def linear_spaced_iterations(total: int, points: int) -> list[int]:
    """Up to ``points`` evenly spaced iterations in [0, total), starting at 0 and ending at
    total − 1 (integer arithmetic: the same on every machine)."""
    if points == 1 or total == 1:
        return [0]
    return sorted({(2 * k * (total - 1) + points - 1) // (2 * (points - 1))
                   for k in range(points)})


def log_spaced_iterations(total: int, points: int) -> list[int]:
    """Up to ``points`` iterations in [0, total), log-spaced, starting at 0 and ending at
    total − 1; rounding can merge neighbours when ``total`` is small."""
    if points == 1 or total == 1:
        return [0]
    its = {round(math.exp(k / (points - 1) * math.log(total))) - 1 for k in range(points)}
    return sorted(its)


def _param_names(opt: Optimizer) -> list[str]:
    by_id = {id(p): name for name, p in opt.model.named_parameters()}
    return [by_id.get(id(p), f"param{i}") for i, p in enumerate(opt.params)]


def _acc_dtype(p: torch.Tensor) -> torch.dtype:
    """Accumulate in float64 (cheap: vectors of nw), except where the device has none."""
    return torch.float32 if p.device.type == "mps" else torch.float64


def _flat(tensors: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1) for t in tensors]).to(dtype)


def _union_gradient(model, loss_fn, batches: list[Batch], params, dtype) -> torch.Tensor:
    """The mean of equal-size batches' gradients = the gradient on their union, taken in
    a few large backward passes (groups of at most max(B, UNION_EXAMPLES) examples) instead
    of one per batch: the same value, far less per-call overhead at small batch sizes."""
    size = len(batches[0])
    per_group = max(1, UNION_EXAMPLES // size)
    total = None
    for start in range(0, len(batches), per_group):
        group = batches[start:start + per_group]
        union = Batch(torch.cat([b.x for b in group]), torch.cat([b.y for b in group]),
                      torch.cat([b.idx for b in group]))
        g = _flat(gradient(model, loss_fn, union, params)[0], dtype).mul_(len(group))
        total = g if total is None else total.add_(g)
    return total / len(batches)


def _mean_of(vectors: Iterable[torch.Tensor]) -> torch.Tensor:
    """Running mean (memory of one vector, not n)."""
    total, count = None, 0
    for v in vectors:
        total = v if total is None else total.add_(v)
        count += 1
    return total / count


@contextmanager
def _isolated() -> Iterator[None]:
    """Gradients on (the caller may be in no_grad), and the global RNG state restored after,
    so a measurement never shifts training's random numbers (e.g. dropout masks)."""
    cpu = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    try:
        with torch.enable_grad():
            yield
    finally:
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
