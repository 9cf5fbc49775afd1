"""Trials that start together in a fresh experiment all declare the same dataset: MLflow looks
it up, then inserts it, so all but one insert fail on the dataset's key. ``log_dataset`` must
take that as "already there" (a trial crashed on it before: its run left RUNNING)."""
from __future__ import annotations

import threading

from mlflow.tracking import MlflowClient

from study.tracking import log_dataset, open_store

THREADS = 12


def test_trials_declaring_one_dataset_at_once_all_succeed(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    experiment = open_store(uri, "race")
    clients = [MlflowClient(uri) for _ in range(THREADS)]   # one store connection each
    runs = [c.create_run(experiment).info.run_id for c in clients]
    start, errors = threading.Barrier(THREADS), []

    def trial(i: int) -> None:
        start.wait()
        try:
            log_dataset(clients[i], runs[i], name="mnist1d-5000", digest="abc", source="/data")
        except Exception as err:  # noqa: BLE001 - collected and reported below
            errors.append(err)

    threads = [threading.Thread(target=trial, args=(i,)) for i in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]
    for run_id in runs:
        inputs = clients[0].get_run(run_id).inputs.dataset_inputs
        assert [(d.dataset.name, d.dataset.digest) for d in inputs] == [("mnist1d-5000", "abc")]
