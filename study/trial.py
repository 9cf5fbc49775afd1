"""One trial: train one model under one optimizer variant at one lr and batch size.

``run_trial`` is the whole training loop and knows nothing about Ray or MLflow: it takes a
``log`` callback (metrics, step) and a ``report`` callback (epoch metrics, checkpoint state)
and can start from a checkpoint state. ``trainable`` (at the bottom) wires it to Ray Tune
and to the trial's MLflow child run. Checkpoints are taken at epoch ends; samplers are
seeded per epoch, so a resumed trial reproduces an uninterrupted one bit for bit.
"""
from __future__ import annotations

import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from study import contract as C
from study.augment import AugmentedSplit
from study.config import TrialConfig
from study.contract import optuna_lr_key
from study.data import DataSplit, epoch_generator, input_shape, load_dataset, num_classes
from study.models import build_model
from study.optim import Context, make_optimizer
from study.optim.base import scheduled_work  # noqa: F401 (tests and bench import it here)
from study.plugins import import_plugins
from study.shadows import Shadow
from study.spec import DatasetSpec, Spec
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
    """(train, validation or None, test). The validation split is the same for every trial
    of a study: a fixed permutation, independent of the trial's seed.

    Labels: ``label_noise`` corrupts the training labels *before* the validation split is
    carved out of them, so each validation label is exactly the (possibly corrupted) training
    label of the example drawn (about the same fraction corrupted); ``test_label_noise`` the test
    labels alone, on their own seed stream. Both use seed 0: every trial of a study sees the
    same labels. With ``fresh`` examples the validation split is a stored block of its own;
    with ``augment`` the training split crops and flips the batches of its epochs.
    """
    d = dataset
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
        total += float(loss_fn(logits, b.y).sum())
        correct += int((logits.argmax(1) == b.y).sum())
    return total / len(split), correct / len(split)


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


def run_trial(config: TrialConfig, log: LogFn | None = None, report: ReportFn | None = None,
              state: dict[str, Any] | None = None, device: str | torch.device = "cpu",
              stop_after: int | None = None) -> dict[str, Any]:
    """Train; return the last epoch's metrics. ``stop_after`` ends the loop after that many
    epochs (tests use it to interrupt a trial)."""
    log = log or (lambda metrics, step: None)
    report = report or (lambda metrics, state: None)
    import_plugins(config.plugins)
    seed, bs = config.seed, config.batch_size
    seed_everything(seed)
    train, val, test = load_splits(config.dataset, device)
    model = build_model(config.model, input_shape(train), num_classes(train, test),
                        **config.model_options).to(device)
    opt = make_optimizer(config.family, model, loss_fn, config.lr, config.variant,
                         **config.options)
    probe = (None if config.measure is None else
             VarianceProbe(config.measure, train, bs, seed, config.epochs * (len(train) // bs)))
    periodic = opt.periodic()
    shadows = ([] if probe is None else
               [Shadow(e, i, model, loss_fn, config.lr, train, bs, seed)
                for i, e in enumerate(config.measure.estimators)])

    c = Progress()
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        if probe is not None and state.get("probe") is not None:
            probe.load_state_dict(state["probe"])
        for shadow, saved in zip(shadows, state.get("shadows") or []):
            shadow.load_state_dict(saved)
        torch.set_rng_state(state["rng"])
        c = Progress(**state["counters"])
    if c.initial_loss is None:
        c.initial_loss = evaluate(model, train)[0]

    metrics: dict[str, Any] = {}
    while c.epoch < config.epochs and not c.diverged and not c.reached_target:
        generator = epoch_generator(seed, c.epoch)
        data = train.for_epoch(seed, c.epoch)    # what this epoch trains on (fresh, augmented)
        ctx = Context(model, loss_fn, data, bs, c.iteration, c.epoch,
                      epoch_generator(seed, c.epoch, PERIODIC_STREAM))
        for shadow in shadows:
            shadow.begin_epoch(c.epoch, c.iteration)
        losses = []
        for idx in opt.sampler(len(train), bs, generator):
            t0 = time.perf_counter()
            c.grad_evals += scheduled_work(periodic, ctx, c.iteration)
            c.time_s += time.perf_counter() - t0
            t0 = time.perf_counter()
            c.shadow_grad_evals += sum(shadow.work(c.iteration) for shadow in shadows)
            probe_step(probe, opt, c.iteration, log, shadows)
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
            c.grad_evals += scheduled_work(periodic, ctx, c.epoch, "epoch")
            c.time_s += time.perf_counter() - t0
            t0 = time.perf_counter()
            c.shadow_grad_evals += sum(shadow.work(c.epoch, "epoch") for shadow in shadows)
            c.measure_s += time.perf_counter() - t0
        metrics = _epoch_metrics(model, opt, (train, val, test), c, losses)
        c.reached_target = config.stop is not None and config.stop.reached(metrics)
        metrics[C.REACHED_TARGET] = int(c.reached_target)
        log(metrics, c.iteration)
        state = {"model": model.state_dict(), "optimizer": opt.state_dict(),
                 "probe": probe.state_dict() if probe is not None else None,
                 "shadows": [shadow.state_dict() for shadow in shadows],
                 "rng": torch.get_rng_state(), "counters": asdict(c)}
        report({**metrics, "histograms": probe.histograms() if probe is not None else None},
               state)
        if stop_after is not None and c.epoch >= stop_after:
            break
    return metrics


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
    """The epoch's metrics: ``contract.EPOCH_METRICS`` and the family's own."""
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


# -- Ray Tune -----------------------------------------------------------------------------------

def search_point(config: dict[str, Any], arms: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Tune's config -> one point of the study's search. Grid configs carry the whole point
    under ``trial``; Optuna configs name an arm and its sampled lr / batch size / seed."""
    if "trial" in config:
        return config["trial"]
    arm = arms[config["arm"]]
    return {**arm, "lr": config[optuna_lr_key(arm["family"])], "batch_size": config["batch_size"],
            "seed": config["seed"]}


def trainable(config: dict[str, Any], spec: Spec, arms: dict[str, dict[str, Any]],
              tracking: dict[str, str]) -> None:
    """The Ray Tune function trainable: one trial, logged to its MLflow child run.

    It writes the run's final status when the trial ends by itself (finished / diverged /
    errored). When Tune ends it (the scheduler stops it, the sweep is interrupted), ``report``
    raises ``SystemExit`` here and the driver writes the status instead."""
    import logging
    import tempfile

    import ray
    from ray import tune

    from study.tracking import TrialRun

    logging.getLogger("ray.train").setLevel(logging.WARNING)  # one line per checkpoint is noise
    cfg = spec.trial_config(search_point(config, arms))
    torch.set_num_threads(cfg.threads)
    device = "cuda" if cfg.gpu > 0 and torch.cuda.is_available() else "cpu"
    run = TrialRun(tracking["uri"], tracking["experiment_id"], tracking["parent_run_id"],
                   tune.get_context().get_trial_id(), cfg.params(),
                   tags={C.TAG_STUDY: spec.name, "family": cfg.family, "variant": cfg.variant,
                         "model": cfg.model, "arm": cfg.arm},
                   dataset=dataset_identity(cfg.dataset))
    run.set_tag(C.TAG_NODE_ID, ray.get_runtime_context().get_node_id())  # this attempt's node
    checkpoint = tune.get_checkpoint()
    state = None
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            state = torch.load(os.path.join(d, "state.pt"), weights_only=False)

    def report(metrics: dict[str, Any], state: dict[str, Any]) -> None:
        histograms = metrics.pop("histograms", None)
        if histograms and (metrics[C.EPOCH] == cfg.epochs or metrics[C.DIVERGED_FLAG]):
            run.log_json(C.GRAD_HIST, histograms)
        with tempfile.TemporaryDirectory() as d:
            torch.save(state, os.path.join(d, "state.pt"))
            tune.report({**metrics, "arm": cfg.arm, "family": cfg.family,
                         C.RUN_ID_KEY: run.run_id},
                        checkpoint=tune.Checkpoint.from_directory(d))

    try:
        final = run_trial(cfg, log=run.log, report=report, state=state, device=device)
    except Exception:
        run.end(C.ERRORED)
        raise
    run.end(C.DIVERGED if final.get(C.DIVERGED_FLAG) else C.FINISHED)


def dataset_identity(dataset: DatasetSpec) -> dict[str, str]:
    """Name, digest and source of the study's data for MLflow's dataset inputs: the digest is
    of the settings that generate / select it (same settings, same examples)."""
    import hashlib

    # options at their defaults are left out, so the digest stays what it was before they existed
    unset = {k for k in ("test_label_noise", "fresh", "augment") if not getattr(dataset, k)}
    digest = hashlib.sha256(dataset.model_dump_json(exclude=unset).encode()).hexdigest()[:10]
    size = f"-{dataset.size}" if dataset.size else ""
    return {"name": f"{dataset.name}{size}", "digest": digest,
            "source": str(Path(dataset.root).resolve() / dataset.name)}
