"""A small but realistic MLflow store, laid out as ``study/contract.py`` says a sweep writes it.

Used by the analysis figure and report tests (not collected itself: no ``test_`` prefix).
Curves are synthetic but shaped like training: accuracy rises towards a ceiling that
depends on the distance of log10(lr) from each family's best LR; by default one trial
diverges, one errors (per model). ``outcome`` decides another status per trial: a stopped
trial logs fewer epochs, an interrupted (or still running) one part of them, an errored one
nothing; the MLflow run status follows ``contract.MLFLOW_STATUS`` unless ``outcome`` names it.
"""
from __future__ import annotations

import json
import math
import time
import zlib
from pathlib import Path

import numpy as np

from study import contract as C

STUDY = "demo"
MODELS = ("mlp", "cnn")
FAMILIES = {"sgd": -1.0, "adam": -2.5, "svrg": -1.0}  # family -> log10 of its best LR
LRS = {"sgd": (0.01, 0.1, 1.0), "adam": (0.0003, 0.003, 0.03), "svrg": (0.01, 0.1, 1.0)}
BATCH_SIZES = (32, 128)
TRAIN_SIZE = 512
EPOCHS = 3
EPOCHS_LOGGED = {C.FINISHED: EPOCHS, C.DIVERGED: EPOCHS, C.STOPPED: 1, C.INTERRUPTED: 2,
                 C.RUNNING: 2, C.ERRORED: 0}
HIST_EDGES = [float(e) for e in np.linspace(-8.0, 1.0, 19)]


def _ceiling(model, family, lr, batch_size):
    base = {"mlp": 0.70, "cnn": 0.92}[model] + {"sgd": 0.0, "adam": 0.01, "svrg": -0.01}[family]
    return base - 0.08 * (math.log10(lr) - FAMILIES[family]) ** 2 - 0.01 * (batch_size == 128)


def _grad_hist(rng):
    iterations = [1, 10, 40]
    layers = {}
    for layer in ("fc1.weight", "fc2.weight"):
        entries = []
        for i, it in enumerate(iterations):
            centre = -3.0 - i  # magnitudes shrink during training
            logs = rng.normal(centre, 0.8, size=2000)
            counts, _ = np.histogram(logs, bins=HIST_EDGES)
            entries.append({"iteration": it, "edges": HIST_EDGES,
                            "counts": [int(c) for c in counts]})
        layers[layer] = entries
    return {"iterations": iterations, "layers": layers}


def _trial_metrics(model, family, lr, batch_size, seed, diverge, epochs=EPOCHS):
    """Metric list (key, value, step) of one trial, per epoch + variance measurements."""
    from mlflow.entities import Metric

    rng = np.random.default_rng(zlib.crc32(f"{model}/{family}/{lr}/{batch_size}/{seed}".encode()))
    steps_per_epoch = TRAIN_SIZE // batch_size
    ceiling = _ceiling(model, family, lr, batch_size)
    work = {"svrg": 2.0}.get(family, 1.0)  # svrg's snapshot passes cost extra gradients
    now = int(time.time() * 1000)
    out = []
    for epoch in range(1, epochs + 1):
        step = epoch * steps_per_epoch
        acc = 0.1 + (ceiling - 0.1) * (1 - math.exp(-epoch / 1.2)) + rng.normal(0, 0.004)
        loss = 2.3 * math.exp(-epoch * ceiling) + 0.05
        if diverge and epoch >= 2:
            acc, loss = 0.1, float("nan")
        values = {"epoch": epoch, "train_loss": loss, "train_accuracy": acc + 0.02,
                  "val_loss": loss * 1.1, "val_accuracy": acc - 0.005, "test_loss": loss * 1.1,
                  "test_accuracy": acc, "grad_evals": work * epoch * TRAIN_SIZE,
                  "time_s": epoch * (0.5 + 0.1 * work), "lr": lr,
                  "diverged": float(diverge and epoch >= 2)}
        out += [Metric(k, float(v), now, step) for k, v in values.items()]
    for step in (1, steps_per_epoch, epochs * steps_per_epoch):
        scale = {"svrg": 0.5, "adam": 0.8}.get(family, 1.0)
        var = scale * 10 ** (-2 + 0.3 * math.log10(step + 1)) / batch_size
        gnorm = 0.5 / math.sqrt(step + 1)
        values = {"var/dir_var": var, "var/dir_nvar": var / gnorm**2, "var/sgd_var": var,
                  "var/sgd_nvar": var / gnorm**2, "var/dir_gnorm": gnorm, "var/bias": 0.0,
                  "var/noise_scale": 40.0 + 20 * math.log10(step + 1) + rng.normal(0, 1)}
        out += [Metric(k, float(v), now, step) for k, v in values.items()]
    return out


def default_outcome(model, family, lr, batch_size, seed):
    """One diverged (sgd at lr 1, batch 32) and one errored (svrg at lr 1, batch 32) trial
    per model, the rest finished."""
    if family == "sgd" and lr == 1.0 and batch_size == 32:
        return C.DIVERGED
    if family == "svrg" and lr == 1.0 and batch_size == 32:
        return C.ERRORED
    return C.FINISHED


def build_store(root: Path, with_hist: bool = True, tracking_uri: str | None = None,
                outcome=default_outcome, spec_text: str | None = None) -> str:
    """Create the store under ``root`` (or in the tracking server at ``tracking_uri``, which
    keeps its own artifacts); returns its tracking URI. ``outcome(model, family, lr,
    batch_size, seed)`` gives a trial's status tag, or (status tag, MLflow run status).
    ``spec_text`` is logged as the parent's spec artifact, as a sweep logs its spec."""
    from mlflow import MlflowClient
    from mlflow.entities import Param

    root.mkdir(parents=True, exist_ok=True)
    uri = tracking_uri or f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    exp_id = client.create_experiment(STUDY, artifact_location=None if tracking_uri else (
        root / "mlartifacts").as_uri())
    parent = client.create_run(exp_id, run_name=f"{STUDY}-sweep-0", tags={
        C.TAG_KIND: C.KIND_STUDY, C.TAG_STUDY: STUDY})
    client.log_batch(parent.info.run_id, params=[Param("dataset", "mnist1d"),
                                                 Param("epochs", str(EPOCHS))])
    if spec_text is not None:
        spec_file = root / "tmp_spec" / C.SPEC_ARTIFACT
        spec_file.parent.mkdir(parents=True, exist_ok=True)
        spec_file.write_text(spec_text)
        client.log_artifact(parent.info.run_id, str(spec_file))
    rng = np.random.default_rng(0)
    for model in MODELS:
        for family, lrs in LRS.items():
            for lr in lrs:
                for batch_size in BATCH_SIZES:
                    seeds = (0, 1) if lr == 10 ** FAMILIES[family] or family == "adam" else (0,)
                    for seed in seeds:
                        status = outcome(model, family, lr, batch_size, seed)
                        status, run_status = (status if isinstance(status, tuple)
                                              else (status, C.MLFLOW_STATUS[status]))
                        epochs = EPOCHS_LOGGED[status]
                        arm = f"{model}/{family}/default"
                        tags = {C.TAG_PARENT: parent.info.run_id,
                                C.TAG_KIND: C.KIND_TRIAL, C.TAG_STUDY: STUDY,
                                "family": family, "variant": "default", "model": model,
                                "arm": arm, C.TAG_TRIAL_ID: f"t{rng.integers(1e9)}",
                                C.TAG_STATUS: status}
                        run = client.create_run(exp_id, tags=tags)
                        rid = run.info.run_id
                        params = {"lr": lr, "batch_size": batch_size, "seed": seed,
                                  "family": family, "variant": "default", "model": model,
                                  "dataset": "mnist1d", "epochs": EPOCHS, "model.width": 64}
                        metrics = _trial_metrics(model, family, lr, batch_size, seed,
                                                 status == C.DIVERGED, epochs) if epochs else []
                        client.log_batch(rid, metrics=metrics, params=[
                            Param(k, str(v)) for k, v in params.items()])
                        if with_hist and epochs and seed == 0:
                            path = root / "tmp_hist" / rid / C.GRAD_HIST
                            path.parent.mkdir(parents=True)
                            path.write_text(json.dumps(_grad_hist(rng)))
                            client.log_artifact(rid, str(path))
                        if run_status != "RUNNING":
                            client.set_terminated(rid, run_status)
    return uri


def build_tune_results(storage: Path) -> Path:
    """A Ray Tune results folder (``<storage>/<study>/<trial>/``) without variance metrics
    or histograms, for the Tune-only report path. Returns the storage root."""
    for family, lrs in (("sgd", (0.01, 0.1)), ("adam", (0.003, 0.03))):
        for lr in lrs:
            trial = storage / STUDY / f"train_{family}_{lr}"
            trial.mkdir(parents=True)
            config = {"model": "mlp", "model_options": {}, "family": family,
                      "variant": "default", "options": {}, "lr": lr, "batch_size": 32,
                      "seed": 0, "arm": f"mlp/{family}/default"}
            (trial / "params.json").write_text(json.dumps(config))
            ceiling = _ceiling("mlp", family, lr, 32)
            lines = []
            for epoch in range(1, EPOCHS + 1):
                acc = 0.1 + (ceiling - 0.1) * (1 - math.exp(-epoch / 1.2))
                lines.append({"step": 16 * epoch, "epoch": epoch, "test_accuracy": acc,
                              "val_accuracy": acc, "train_loss": 2.0 / epoch,
                              "grad_evals": 512.0 * epoch, "time_s": 0.5 * epoch,
                              "diverged": 0, "training_iteration": epoch,
                              "trial_id": trial.name, "config": config,
                              "done": epoch == EPOCHS})
            (trial / "result.json").write_text("\n".join(json.dumps(x) for x in lines))
    return storage
