"""``LeanTrialState`` trims what Tune keeps per trial, O(1) per event: after the first step
(every trial: it may follow a restore) only the trials a result or checkpoint touched."""
from __future__ import annotations

import pickle
from types import SimpleNamespace

from study.search import LeanTrialState


class Meta:
    """The parts of Tune's per-trial run metadata the callback touches."""

    def __init__(self, kept: list[dict] | None = None):
        self.metric_analysis, self.metric_n_steps = {"loss": {"avg": 1.0}}, {"loss": {"5": 1}}
        self.checkpoint_manager = SimpleNamespace(
            _checkpoint_results=[SimpleNamespace(metrics=m) for m in kept or []])
        self.invalidated = 0

    def invalidate_cache(self) -> None:
        self.invalidated += 1


class Trial:
    """Hashable, as Tune's trials are (by identity here)."""

    def __init__(self):
        self.run_metadata = Meta([{"epoch": 1, "extra": 2}])


def trials(n: int) -> list[Trial]:
    return [Trial() for _ in range(n)]


def callback(kind: str = "grid") -> LeanTrialState:
    return LeanTrialState(SimpleNamespace(search=SimpleNamespace(metric="val_accuracy",
                                                                 kind=kind)))


def test_the_first_step_trims_every_trial_then_only_those_touched():
    lean, all_trials = callback(), trials(3)
    lean.on_step_end(0, all_trials)
    for t in all_trials:
        assert t.run_metadata.metric_analysis == {} and t.run_metadata.invalidated == 1
        assert t.run_metadata.checkpoint_manager._checkpoint_results[0].metrics == {"epoch": 1}

    for t in all_trials:                       # Tune fills its statistics again
        t.run_metadata.metric_analysis = {"loss": {"avg": 2.0}}
    result = {"epoch": 2, "val_accuracy": 0.5, "train_batch_loss": 0.1}
    lean.on_trial_result(1, all_trials, all_trials[1], result)
    assert result == {"epoch": 2, "val_accuracy": 0.5}, "the result is trimmed in place"
    lean.on_step_end(1, all_trials)
    assert [t.run_metadata.metric_analysis == {} for t in all_trials] == [False, True, False]

    lean.on_checkpoint(2, all_trials, all_trials[2], checkpoint=None)
    lean.on_step_end(2, all_trials)
    assert [t.run_metadata.metric_analysis == {} for t in all_trials] == [False, True, True]
    lean.on_step_end(3, all_trials)            # nothing touched: nothing visited
    assert all_trials[0].run_metadata.metric_analysis == {"loss": {"avg": 2.0}}


def test_pickled_with_the_tuner_it_forgets_the_trials_it_had_seen():
    lean, all_trials = callback(), trials(2)
    lean.on_step_end(0, all_trials)
    lean.on_trial_result(1, all_trials, all_trials[0], {"epoch": 1})
    restored = pickle.loads(pickle.dumps(lean))
    assert restored._touched is None and restored.keep == lean.keep


def test_a_trial_that_reached_its_target_stays_finished_after_trimming(tmp_path):
    """The driver settles a trial from Tune's last result, which LeanTrialState trims: a trial
    that ended early at its spec's stop target must still read as finished, not stopped (seen
    in critical_batch: 28 of 35 trials marked stopped)."""
    from study import contract as C
    from study.tracking import client_for, open_store, study_parent
    from study.tune import TrialOutcomes

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    experiment = open_store(uri, "lean")
    parent = study_parent(uri, experiment, "lean", None, {}, {})
    run_id = client_for(uri).create_run(experiment, tags={C.TAG_STATUS: C.FINISHED}).info.run_id
    result = {C.RUN_ID_KEY: run_id, C.EPOCH: 3, C.DIVERGED_FLAG: 0, C.REACHED_TARGET: 1,
              "val_accuracy": 0.9, "train_loss": 0.1, "extra": 1.0}
    trial = Trial()
    callback().on_trial_result(0, [trial], trial, result)
    assert "extra" not in result
    trial.last_result = result
    TrialOutcomes(uri, experiment, parent, epochs=20, storage={}).on_trial_complete(0, [], trial)
    assert client_for(uri).get_run(run_id).data.tags[C.TAG_STATUS] == C.FINISHED


GRID_CONFIG = {"grid_point": "7:mlp/sgd/plain",
               "trial": {"arm": "mlp/sgd/plain", "model": "mlp", "model_options": {"widths": [8]},
                         "family": "sgd", "variant": "plain", "options": {}, "lr": 0.1,
                         "batch_size": 32, "seed": 0}}


def test_the_results_copy_of_the_config_keeps_the_progress_tables_columns():
    result = {"epoch": 1, "config": GRID_CONFIG}
    assert callback()._trim(result)
    assert result["config"] == {"trial": {"arm": "mlp/sgd/plain", "lr": 0.1, "batch_size": 32}}
    optuna = {"arm": "mlp/sgd/plain", "lr_sgd": 0.1, "batch_size": 32, "seed": 0}
    result = {"epoch": 1, "config": optuna}
    callback("optuna")._trim(result)
    assert result["config"] == {"arm": "mlp/sgd/plain", "batch_size": 32}
    assert not callback("optuna")._trim(result), "trimmed once, nothing more to trim"


def test_a_real_tune_trials_state_is_stored_compact_and_restores_the_same():
    """Tune's own Trial: its cached JSON texts are compact after a step (smaller by the
    whitespace) and load back to the same trial, config and last result."""
    from ray.tune.execution.placement_groups import PlacementGroupFactory
    from ray.tune.experiment.trial import Trial as TuneTrial
    from ray.tune.progress_reporter import _best_trial_str

    trial = TuneTrial("trainable", config=GRID_CONFIG, stub=True,
                      placement_group_factory=PlacementGroupFactory([{"CPU": 1}]))
    trial.create_placement_group_factory()      # as Tune does when it adds the trial
    result = {"epoch": 3, "val_accuracy": 0.5, "extra": 1.0, "training_iteration": 3,
              "config": dict(GRID_CONFIG)}
    lean = callback()
    lean.on_trial_result(0, [trial], trial, result)
    trial.update_last_result(result)
    indented = [len(text) for text in trial.get_json_state()]
    lean.on_step_end(0, [trial])
    state, meta = trial.get_json_state()
    assert len(state) < 0.9 * indented[0] and len(meta) < 0.9 * indented[1]
    assert "\n" not in state + meta
    again = TuneTrial.from_json_state(state, stub=True)
    again.restore_run_metadata(meta)
    assert again.trial_id == trial.trial_id and again.config == GRID_CONFIG
    assert again.last_result == {"epoch": 3, "val_accuracy": 0.5, "training_iteration": 3,
                                 "trial_id": trial.trial_id,
                                 "config": {"trial": {"arm": "mlp/sgd/plain", "lr": 0.1,
                                                      "batch_size": 32}}}
    # Tune's "Current best trial" line reads the table's columns from the result's config
    line = _best_trial_str(again, "val_accuracy", {"trial/arm": "arm", "trial/lr": "lr"})
    assert "'trial/lr': 0.1" in line

    trial.set_status(TuneTrial.TERMINATED)   # Tune writes its cache again, indented
    assert "\n" in trial.get_json_state()[0]
    lean.on_trial_complete(1, [trial], trial)
    lean.on_step_end(1, [trial])
    assert "\n" not in trial.get_json_state()[0]
