"""A study spread over a multi-node Ray cluster with fractional GPUs, tracked through a real
MLflow HTTP server: what `ray up cluster.yaml` gives, simulated on one machine.

`ray.cluster_utils.Cluster` starts a real head and two real worker raylets; the workers declare
one GPU each (the GPUs are not real: trials see no CUDA device and train on CPU, but Ray places
them exactly as it would on GPU nodes). With 0.25 GPU per trial, four trials must run at once on
each worker node, and every trial must land once in MLflow under the sweep's parent run.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:              # the spec's plugin is tests.plugins.faulty
    sys.path.insert(0, str(ROOT))

TRIALS = 8
STEP_SLEEP_S = 0.5   # 22 steps x 2 epochs x 0.5 s: each trial lasts ~25 s, longer than the
                     # spread of 8 trial workers starting on 2 cores


def tiny_spec(name: str, data_root: Path, storage: Path, **overrides) -> dict:
    """A study of short, mostly-sleeping trials (the faulty family with no fault)."""
    spec = {
        "name": name,
        "dataset": {"name": "mnist1d", "size": 1000, "root": str(data_root)},
        "models": [{"name": "mlp", "widths": [32]}],
        "epochs": 2,
        "lr": [round(0.01 * (i + 1), 3) for i in range(TRIALS)],
        "batch_size": [32],
        "families": {"faulty": {"options": {"sleep_s": STEP_SLEEP_S}}},
        "plugins": ["tests.plugins.faulty"],
        "resources": {"cpu": 1, "gpu": 0.25},
        "measure": {"every": 0, "histograms": False},
        "storage": str(storage),
    }
    spec.update(overrides)
    return spec


def max_overlap(intervals: list[tuple[int, int]]) -> int:
    """The largest number of [start, end) intervals that contain one instant."""
    events = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals],
                    key=lambda ev: (ev[0], ev[1]))
    running = best = 0
    for _, delta in events:
        running += delta
        best = max(best, running)
    return best


def child_runs(client, study: str, parent_run_id: str):
    exp = client.get_experiment_by_name(study)
    return client.search_runs([exp.experiment_id],
                              f"tags.mlflow.parentRunId = '{parent_run_id}'", max_results=1000)


@pytest.mark.slow
def test_fractional_gpu_trials_fill_two_gpu_nodes(tmp_path, short_tmp, mlflow_server,
                                                  monkeypatch):
    import ray
    from mlflow.tracking import MlflowClient
    from ray.cluster_utils import Cluster

    from study.spec import parse_spec
    from study.tune import run_study

    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    cluster = Cluster(initialize_head=True,
                      head_node_args={"num_cpus": 1, "num_gpus": 0, "temp_dir": str(short_tmp)})
    workers = [cluster.add_node(num_cpus=4, num_gpus=1) for _ in range(2)]
    cluster.wait_for_nodes()
    try:
        spec = parse_spec(tiny_spec("multinode", tmp_path / "data", tmp_path / "results"))
        result = run_study(spec, None, address=cluster.address, tracking_uri=mlflow_server.uri)
        worker_ids = {w.node_id for w in workers}
    finally:
        ray.shutdown()
        cluster.shutdown()

    assert result.statuses == {"finished": TRIALS}, result.statuses
    client = MlflowClient(mlflow_server.uri)
    runs = child_runs(client, "multinode", result.parent_run_id)
    assert len(runs) == TRIALS, "every trial lands exactly once under the parent run"
    assert len({r.data.tags["trial_id"] for r in runs}) == TRIALS
    assert sorted(float(r.data.params["lr"]) for r in runs) == spec.lr
    for run in runs:
        assert run.data.tags["status"] == "finished"
        epochs = client.get_metric_history(run.info.run_id, "epoch")
        assert sorted(m.value for m in epochs) == [1.0, 2.0]

    by_node: dict[str, list[tuple[int, int]]] = {}
    for run in runs:
        node = run.data.tags.get("node_id", "")
        by_node.setdefault(node, []).append((run.info.start_time, run.info.end_time))
    assert set(by_node) == worker_ids, f"trials ran on {set(by_node)}, GPU workers {worker_ids}"
    overall = max_overlap([iv for ivs in by_node.values() for iv in ivs])
    per_node = {node: max_overlap(ivs) for node, ivs in by_node.items()}
    assert overall == TRIALS, f"at most {overall} trials ran at once"
    assert all(n == 4 for n in per_node.values()), per_node


def test_max_overlap():
    assert max_overlap([(0, 10), (5, 15), (10, 20)]) == 2
    assert max_overlap([(0, 1), (1, 2)]) == 1
    assert max_overlap([(0, 9)] * 4) == 4
