"""One trial: train one model under one optimizer variant at one lr and batch size.

``run_trial`` is the whole training loop and knows nothing about Ray or MLflow: it takes a
``log`` callback (metrics, step) and a ``report`` callback (epoch metrics, checkpoint state or
None) and can start from a checkpoint state. ``study.trainable`` wires it to Ray Tune and to
the trial's MLflow child run. A checkpoint state is handed over at the end of the first
evaluated epoch ``checkpoint_every_s`` after the last one and at the trial's last epoch;
samplers are seeded per epoch, so a resumed trial reproduces an uninterrupted one bit for bit.
"""
from __future__ import annotations

import contextlib
import functools
import math
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from study import contract as C
from study.augment import AugmentedSplit
from study.config import TrialConfig
from study.data import DataSplit, epoch_generator, input_shape, load_dataset, num_classes
from study.models import build_model
from study.optim import Context, make_optimizer
from study.optim.base import scheduled_work  # noqa: F401 (tests and bench import it here)
from study.plugins import import_plugins
from study.shadows import Shadow
from study.spec import DatasetSpec
from study.variance import VarianceProbe

DIVERGENCE_FACTOR = 10.0     # a batch loss this many times the initial loss ends the trial
PERIODIC_STREAM = -1         # the generator stream scheduled work draws from
EVAL_BATCH = 2048

LogFn = Callable[[dict[str, float], int], None]
ReportFn = Callable[[dict[str, Any], dict[str, Any]], None]


def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, targets, reduction="none")


def load_splits(dataset: DatasetSpec, device: str | torch.device = "cpu"
                ) -> tuple[DataSplit, DataSplit | None, DataSplit]:
    """(train, validation or None, test), kept per process: Ray reuses a worker process for
    many trials of a study, which then share these tensors (nothing writes to them).
    """
    return _splits(dataset.model_dump_json(), str(device))


@functools.lru_cache(maxsize=2)
def _splits(dataset_json: str, device: str) -> tuple[DataSplit, DataSplit | None, DataSplit]:
    """``load_splits``' work. The validation split is the same for every trial of a study: a
    fixed permutation, independent of the trial's seed.

    Labels: ``label_noise`` corrupts the training labels *before* the validation split is
    carved out of them, so each validation label is exactly the (possibly corrupted) training
    label of the example drawn (about the same fraction corrupted); ``test_label_noise`` the test
    labels alone, on their own seed stream. Both use seed 0: every trial of a study sees the
    same labels. With ``fresh`` examples the validation split is a stored block of its own;
    with ``augment`` the training split crops and flips the batches of its epochs.
    """
    d = DatasetSpec.model_validate_json(dataset_json)
    train, test = load_dataset(d.name, d.root, d.size, d.label_noise, seed=0, download=d.download,
                               device=device, test_label_noise=d.test_label_noise,
                               fresh=d.fresh)
    n_val = int(round(len(train) * d.val_fraction))
    val = None
    if n_val:
        train, val = train.hold_out(n_val)
    if d.augment:                 # the epochs' batches only: metrics and the probe read as stored
        train = AugmentedSplit(train.x, train.y)
    return train, val, test


@torch.no_grad()
def evaluate(model: torch.nn.Module, split: DataSplit) -> tuple[float, float]:
    """(mean loss, accuracy) in large batches."""
    total, correct = 0.0, 0
    for b in split.batches(EVAL_BATCH):
        logits = model(b.x)
        total += float(_summed_loss(logits, b.y))
        correct += int((logits.argmax(1) == b.y).sum())
    return total / len(split), correct / len(split)


def _summed_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``loss_fn(logits, targets).sum()`` computed over (classes, examples): torch's CPU
    log-softmax over the first dimension is ~5x faster than over a short last one (1,000 x
    10 logits: 42 vs 227 us, the same values), a fifth of a small model's evaluation.
    Training keeps ``loss_fn``: with autograd at its batch sizes the transpose is slower."""
    return -torch.log_softmax(logits.t(), 0).gather(0, targets[None]).sum()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class Progress:
    """The loop's counters: checkpointed with the weights, so a resumed trial continues them."""

    epoch: int = 0                    # epochs finished
    iteration: int = 0                # steps taken
    grad_evals: int = 0               # examples through a backward (steps + scheduled work)
    time_s: float = 0.0               # training seconds (steps + scheduled work)
    measure_s: float = 0.0            # variance-probe seconds (not training), shadows' work too
    shadow_grad_evals: int = 0        # the shadow estimators' own scheduled work (not training)
    initial_loss: float | None = None  # the training loss before the first step
    diverged: bool = False
    reached_target: bool = False      # spec.stop's target met: the trial is done

    def diverges(self, loss: float) -> bool:
        return not math.isfinite(loss) or loss > DIVERGENCE_FACTOR * self.initial_loss


class Phases(dict):
    """Seconds a trial spends besides training and measuring, by phase (startup, data, eval,
    checkpoint, report, log): what bench/trial_overhead.py splits its wall time into. Saved
    with the checkpoint state, so a resumed trial continues them."""

    @contextlib.contextmanager
    def timed(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self[name] = self.get(name, 0.0) + time.perf_counter() - t0


def run_trial(config: TrialConfig, log: LogFn | None = None, report: ReportFn | None = None,
              state: dict[str, Any] | None = None, device: str | torch.device = "cpu",
              stop_after: int | None = None, phases: Phases | None = None) -> dict[str, Any]:
    """Train; return the last epoch's metrics (a trial resumed from its last epoch: the
    state's). ``report`` gets every epoch's metrics and, at checkpoints, the state to resume
    from (else None). ``stop_after`` ends the loop after that
    many epochs (tests use it to interrupt a trial); its last epoch is a checkpoint."""
    log = log or (lambda metrics, step: None)
    report = report or (lambda metrics, state: None)
    phases = Phases() if phases is None else phases
    with phases.timed("startup"):
        import_plugins(config.plugins)
        seed_everything(config.seed)
    with phases.timed("data"):
        train, val, test = load_splits(config.dataset, device)
    with phases.timed("startup"):
        parts = _Parts(config, train, test, device)
        c = parts.restore(state, phases)
    model, opt, probe = parts.model, parts.opt, parts.probe
    train_eval = train.sample(config.eval_train_examples)   # what the training metrics read
    if c.initial_loss is None:    # the divergence reference: the training loss at step 0
        with phases.timed("eval"):
            c.initial_loss = evaluate(model, train_eval)[0]

    metrics: dict[str, Any] = {}
    saved_at = time.monotonic()
    while c.epoch < config.epochs and not c.diverged and not c.reached_target:
        losses = _train_epoch(config, parts, train, c, log)
        last = (c.epoch >= config.epochs or c.diverged
                or (stop_after is not None and c.epoch >= stop_after))
        splits = (train_eval, val, test) if last or c.epoch % config.eval_every == 0 else ()
        with phases.timed("eval"):
            metrics = _epoch_metrics(model, opt, splits, c, losses)
        c.reached_target = config.stop is not None and config.stop.reached(metrics)
        metrics[C.REACHED_TARGET] = int(c.reached_target)
        log(metrics, c.iteration)
        due = bool(splits) and (last or c.reached_target   # evaluated: Tune gets a result
                                or time.monotonic() - saved_at >= config.checkpoint_every_s)
        extra = {}
        if probe is not None and (c.epoch == config.epochs or c.diverged):
            extra["histograms"] = probe.histograms()
        with phases.timed("checkpoint"):
            saved = parts.state(c, phases, metrics) if due else None
        report({**metrics, **extra}, saved)
        saved_at = time.monotonic() if due else saved_at
        if stop_after is not None and c.epoch >= stop_after:
            break
    return metrics or (state or {}).get("metrics", {})   # resumed when already done: its last


class _Parts:
    """What a trial trains and measures with: model, optimizer, probe, shadows."""

    def __init__(self, config: TrialConfig, train: DataSplit, test: DataSplit, device):
        seed, bs = config.seed, config.batch_size
        self.model = build_model(config.model, input_shape(train), num_classes(train, test),
                                 **config.model_options).to(device)
        self.opt = make_optimizer(config.family, self.model, loss_fn, config.lr, config.variant,
                                  **config.options)
        self.probe = (None if config.measure is None else
                      VarianceProbe(config.measure, train, bs, seed,
                                    config.epochs * (len(train) // bs)))
        self.periodic = self.opt.periodic()
        self.shadows = ([] if self.probe is None else
                        [Shadow(e, i, self.model, loss_fn, config.lr, train, bs, seed)
                         for i, e in enumerate(config.measure.estimators)])

    def restore(self, state: dict[str, Any] | None, phases: Phases) -> Progress:
        if state is None:
            return Progress()
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        if self.probe is not None and state.get("probe") is not None:
            self.probe.load_state_dict(state["probe"])
        for shadow, saved in zip(self.shadows, state.get("shadows") or []):
            shadow.load_state_dict(saved)
        torch.set_rng_state(state["rng"])
        for name, seconds in (state.get("phases") or {}).items():
            phases[name] = phases.get(name, 0.0) + seconds
        return Progress(**state["counters"])

    def state(self, c: Progress, phases: Phases, metrics: dict[str, Any]) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "optimizer": self.opt.state_dict(),
                "probe": self.probe.state_dict() if self.probe is not None else None,
                "shadows": [shadow.state_dict() for shadow in self.shadows],
                "rng": torch.get_rng_state(), "counters": asdict(c), "phases": dict(phases),
                "metrics": metrics}


def _train_epoch(config: TrialConfig, parts: _Parts, train: DataSplit, c: Progress,
                 log: LogFn) -> list[float]:
    """One epoch of steps (with the scheduled work and the probe's measurements due in it);
    returns the mini-batch losses."""
    seed, bs, opt, shadows = config.seed, config.batch_size, parts.opt, parts.shadows
    generator = epoch_generator(seed, c.epoch)
    data = train.for_epoch(seed, c.epoch)    # what this epoch trains on (fresh, augmented)
    ctx = Context(parts.model, loss_fn, data, bs, c.iteration, c.epoch,
                  epoch_generator(seed, c.epoch, PERIODIC_STREAM))
    for shadow in shadows:
        shadow.begin_epoch(c.epoch, c.iteration)
    losses = []
    for idx in opt.sampler(len(train), bs, generator):
        t0 = time.perf_counter()
        c.grad_evals += scheduled_work(parts.periodic, ctx, c.iteration)
        c.time_s += time.perf_counter() - t0
        t0 = time.perf_counter()
        c.shadow_grad_evals += sum(shadow.work(c.iteration) for shadow in shadows)
        probe_step(parts.probe, opt, c.iteration, log, shadows)
        c.measure_s += time.perf_counter() - t0
        t0 = time.perf_counter()
        d = opt.direction(data.batch(idx))
        if c.diverges(d.loss):
            c.diverged = True
            break
        opt.step(d)
        c.grad_evals += d.grad_evals
        c.iteration += 1
        c.time_s += time.perf_counter() - t0
        losses.append(d.loss)
    c.epoch += 1
    if not c.diverged:
        t0 = time.perf_counter()
        c.grad_evals += scheduled_work(parts.periodic, ctx, c.epoch, "epoch")
        c.time_s += time.perf_counter() - t0
        t0 = time.perf_counter()
        c.shadow_grad_evals += sum(shadow.work(c.epoch, "epoch") for shadow in shadows)
        c.measure_s += time.perf_counter() - t0
    return losses


def probe_step(probe, opt, iteration: int, log: LogFn | None = None, shadows: list = ()) -> int:
    """The variance probe's work at ``iteration`` (after the scheduled work, the shadows' too:
    a direction may need it, e.g. SVRG's first snapshot). Returns how many things it
    recorded."""
    if probe is None:
        return 0
    done = 0
    if probe.due(iteration):
        metrics = probe.measure(opt, iteration, shadows)
        if log is not None:
            log(metrics, iteration)
        done += 1
    if probe.histogram_due(iteration):
        span = probe.record_histogram(opt, iteration)
        if log is not None:
            log(span, iteration)
        done += 1
    return done


def _epoch_metrics(model, opt, splits, c: Progress, losses) -> dict[str, Any]:
    """The epoch's metrics: ``contract.EPOCH_METRICS`` (the splits' only from the ``splits``
    given: none at epochs ``eval_every`` skips) and the family's own."""
    metrics: dict[str, Any] = {C.EPOCH: c.epoch, C.ITERATION: c.iteration,
                               C.GRAD_EVALS: c.grad_evals, C.TIME_S: c.time_s,
                               C.MEASURE_S: c.measure_s, C.LR: opt.lr,
                               C.SHADOW_GRAD_EVALS: c.shadow_grad_evals,
                               C.DIVERGED_FLAG: int(c.diverged),
                               C.TRAIN_BATCH_LOSS: float(np.mean(losses)) if losses else math.nan}
    for name, split in zip(("train", "val", "test"), splits):
        if split is not None:
            loss, accuracy = C.SPLIT_METRICS[name]
            metrics[loss], metrics[accuracy] = evaluate(model, split)
    metrics.update(opt.metrics())
    return metrics
