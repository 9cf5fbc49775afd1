"""The trial loop without Ray: resume exactness, divergence as a result, cost accounting."""
import math

import pytest
import torch

from study.spec import parse_spec
from study.trial import run_trial


def tiny_spec(tmp_path, **over):
    raw = {"name": "t", "dataset": {"name": "mnist1d", "size": 600, "root": str(tmp_path)},
           "models": [{"name": "mlp", "widths": [16]}], "epochs": 4, "lr": [0.1],
           "batch_size": [32], "families": {"sgd": {"variants": ["momentum"]}},
           "measure": {"every": 0, "histograms": False}}
    raw.update(over)
    return parse_spec(raw)


def collect():
    reports = []
    return reports, lambda metrics, state: reports.append((metrics, state))


@pytest.mark.parametrize("family,variant", [("sgd", "momentum"), ("adam", "adam")])
def test_interrupted_and_resumed_trial_ends_with_identical_weights(tmp_path, family, variant):
    spec = tiny_spec(tmp_path, families={family: {"variants": [variant]}})
    config = spec.trial_config(spec.trials()[0])
    full, report_full = collect()
    run_trial(config, report=report_full)
    part, report_part = collect()
    run_trial(config, report=report_part, stop_after=2)
    assert len(part) == 2
    # resume from the checkpoint state of epoch 2, as Ray hands it back after a restart
    torch.save(part[-1][1], tmp_path / "state.pt")
    state = torch.load(tmp_path / "state.pt", weights_only=False)
    rest, report_rest = collect()
    run_trial(config, report=report_rest, state=state)
    assert [m["epoch"] for m, _ in rest] == [3, 4]
    final_full, final_resumed = full[-1][1]["model"], rest[-1][1]["model"]
    for key in final_full:
        assert torch.equal(final_full[key], final_resumed[key]), key
    assert full[-1][0]["grad_evals"] == rest[-1][0]["grad_evals"]
    assert full[-1][0]["test_accuracy"] == rest[-1][0]["test_accuracy"]


def test_divergence_is_a_result_not_an_error(tmp_path):
    spec = tiny_spec(tmp_path, lr=[1e4])
    reports, report = collect()
    metrics = run_trial(spec.trial_config(spec.trials()[0]), report=report)
    assert metrics["diverged"] == 1
    assert len(reports) == 1, "a diverged trial stops at the epoch it diverged in"


def test_cost_counts_examples_through_a_backward(tmp_path):
    spec = tiny_spec(tmp_path, epochs=2)
    metrics = run_trial(spec.trial_config(spec.trials()[0]))
    steps = (480 - 48) // 32            # 600 examples: 480 train, 10% of them validation
    assert metrics["iteration"] == 2 * steps
    assert metrics["grad_evals"] == 2 * steps * 32
    assert metrics["time_s"] > 0 and not math.isnan(metrics["train_loss"])
    assert {"val_accuracy", "test_accuracy", "train_accuracy"} <= set(metrics)


def test_training_learns_mnist1d(tmp_path):
    spec = tiny_spec(tmp_path, epochs=10, dataset={"name": "mnist1d", "size": 2000,
                                                   "root": str(tmp_path)})
    metrics = run_trial(spec.trial_config(spec.trials()[0]))
    assert metrics["train_loss"] < 1.6 and metrics["test_accuracy"] > 0.3


def test_a_trial_stops_at_the_first_epoch_that_reaches_its_target(tmp_path):
    """``stop: {metric: train_loss, below: x}`` with x the loss the straight run has after
    epoch 2 (read from that run): the stopped run reports exactly epochs 1-2, identical to the
    straight run's, and its checkpoint resumes to nothing more."""
    spec = tiny_spec(tmp_path)
    straight, report = collect()
    run_trial(spec.trial_config(spec.trials()[0]), report=report)
    target = straight[1][0]["train_loss"]
    assert straight[0][0]["train_loss"] > target      # epoch 1 has not reached it
    stopping = tiny_spec(tmp_path, stop={"metric": "train_loss", "below": target})
    config = stopping.trial_config(stopping.trials()[0])
    stopped, report = collect()
    final = run_trial(config, report=report)
    assert [m["epoch"] for m, _ in stopped] == [1, 2]
    assert final["train_loss"] == straight[1][0]["train_loss"]
    again, report = collect()
    assert run_trial(config, report=report, state=stopped[-1][1]) == final
    assert again == []                                  # resumed: already done


def test_stop_targets_are_checked(tmp_path):
    from study.spec import SpecError
    for stop, message in [({"metric": "test_loss", "below": 1.0}, "test data"),
                          ({"metric": "train_los", "below": 1.0}, "stop.metric"),
                          ({"metric": "train_loss"}, "one of below / above")]:
        with pytest.raises(SpecError, match=message):
            tiny_spec(tmp_path, stop=stop)


def test_checkpoints_follow_their_period_and_the_last_epoch_always_has_one(tmp_path):
    """Every epoch at ``checkpoint.every_s: 0``; with a period longer than the trial only the
    last epoch (and a ``stop_after`` interruption) hands over a state. Metrics come every
    epoch either way."""
    import dataclasses

    spec = tiny_spec(tmp_path)
    config = spec.trial_config(spec.trials()[0])
    every, report = collect()
    run_trial(dataclasses.replace(config, checkpoint_every_s=0.0), report=report)
    assert [s is not None for _, s in every] == [True] * 4
    rare, report = collect()
    run_trial(dataclasses.replace(config, checkpoint_every_s=3600.0), report=report)
    assert [s is not None for _, s in rare] == [False, False, False, True]
    assert [m["epoch"] for m, _ in rare] == [1, 2, 3, 4]
    part, report = collect()
    run_trial(dataclasses.replace(config, checkpoint_every_s=3600.0), report=report, stop_after=2)
    assert [s is not None for _, s in part] == [False, True]
    assert set(part[-1][1]["phases"]) >= {"startup", "data", "eval"}


def test_evaluation_every_k_epochs_and_always_the_last(tmp_path):
    """``evaluate.every: 3`` over 4 epochs evaluates epochs 3 and 4; the training counters
    are reported every epoch, and training is the same as with every-epoch evaluation."""
    spec = tiny_spec(tmp_path)
    sparse = tiny_spec(tmp_path, evaluate={"every": 3})
    full, report = collect()
    run_trial(spec.trial_config(spec.trials()[0]), report=report)
    some, report = collect()
    run_trial(sparse.trial_config(sparse.trials()[0]), report=report)
    assert ["val_accuracy" in m for m, _ in some] == [False, False, True, True]
    assert all("grad_evals" in m and "train_batch_loss" in m for m, _ in some)
    assert some[-1][0]["test_accuracy"] == full[-1][0]["test_accuracy"]
    for key, value in full[-1][1]["model"].items():
        assert torch.equal(value, some[-1][1]["model"][key]), key


def test_training_metrics_over_a_fixed_sample_of_the_training_split(tmp_path):
    """``evaluate.train_examples: 100``: train_loss / train_accuracy are those of 100 stored
    training examples (a float64 loop over them, one at a time, with the trial's last
    weights), the same 100 whatever the global seed; training, val and test are unchanged."""
    from study.data import input_shape, num_classes
    from study.models import build_model
    from study.trial import load_splits, seed_everything

    spec = tiny_spec(tmp_path)
    sampled = tiny_spec(tmp_path, evaluate={"train_examples": 100})
    config = sampled.trial_config(sampled.trials()[0])
    assert config.params()["eval.train_examples"] == 100
    full, report = collect()
    run_trial(spec.trial_config(spec.trials()[0]), report=report)
    some, report = collect()
    run_trial(config, report=report)
    metrics, state = some[-1]
    assert metrics["test_accuracy"] == full[-1][0]["test_accuracy"]
    assert metrics["val_loss"] == full[-1][0]["val_loss"]

    train, _, test = load_splits(config.dataset)
    torch.manual_seed(99)
    sample = train.sample(100)
    assert torch.equal(sample.x, train.sample(100).x) and len(sample) == 100
    rows = {tuple(r.tolist()) for r in train.x.flatten(1)}
    assert len({tuple(r.tolist()) for r in sample.x.flatten(1)} & rows) == 100
    model = build_model(config.model, input_shape(train), num_classes(train, test),
                        **config.model_options)
    model.load_state_dict(state["model"])
    loss, accuracy = float64_loop(model, sample)
    assert metrics["train_loss"] == pytest.approx(loss, rel=1e-5)
    assert metrics["train_accuracy"] == accuracy
    assert abs(full[-1][0]["train_loss"] - metrics["train_loss"]) > 1e-3   # not the whole split

    # the divergence reference is the training loss over the same sample, at the initial weights
    seed_everything(config.seed)
    initial = build_model(config.model, input_shape(train), num_classes(train, test),
                          **config.model_options)
    initial_loss, _ = float64_loop(initial, sample)
    assert state["counters"]["initial_loss"] == pytest.approx(initial_loss, rel=1e-5)
    assert abs(full[-1][1]["counters"]["initial_loss"] - state["counters"]["initial_loss"]) > 1e-4


def float64_loop(model, split) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of ``model`` over ``split``, one example at a time in
    float64: the truth the trial's evaluation is checked against."""
    model = model.double()
    losses, correct = [], 0
    with torch.no_grad():
        for x, y in zip(split.x.double(), split.y):
            logits = model(x[None])[0]
            losses.append(float(torch.logsumexp(logits, 0) - logits[y]))
            correct += int(logits.argmax() == y)
    return math.fsum(losses) / len(losses), correct / len(losses)


@pytest.mark.parametrize("n", [1, 2047, 2049, 4500])
def test_evaluate_matches_a_float64_loop_over_examples(n):
    """Loss and accuracy over a split in large batches (the last one partial) against the
    float64 loop, on a model whose predictions are mixed (some right, some wrong)."""
    from study.data import DataSplit
    from study.models import build_model
    from study.trial import evaluate

    g = torch.Generator().manual_seed(n)
    split = DataSplit(torch.randn(n, 40, generator=g), torch.randint(0, 10, (n,), generator=g))
    torch.manual_seed(0)
    model = build_model("mlp", (40,), 10, widths=[16])
    loss, accuracy = evaluate(model, split)
    true_loss, true_accuracy = float64_loop(model, split)
    assert n == 1 or 0 < true_accuracy < 1
    assert loss == pytest.approx(true_loss, rel=1e-6)
    assert accuracy == true_accuracy
