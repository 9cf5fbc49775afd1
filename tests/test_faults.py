"""A study stays up through faults: a worker node lost mid-study, a trial that raises, and a
tracking server that is not there (which must stop the sweep before any trial starts)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:              # the specs' plugin is tests.plugins.faulty
    sys.path.insert(0, str(ROOT))


def spec_dict(name: str, tmp_path: Path, **overrides) -> dict:
    spec = {
        "name": name,
        "dataset": {"name": "mnist1d", "size": 1000, "root": str(tmp_path / "data")},
        "models": [{"name": "mlp", "widths": [32]}],
        "epochs": 3,
        "lr": [0.05],
        "batch_size": [32],
        "families": {"faulty": None},
        "plugins": ["tests.plugins.faulty"],
        "resources": {"cpu": 1},
        "measure": {"every": 0, "histograms": False},
        "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
        "storage": str(tmp_path / "results"),
    }
    spec.update(overrides)
    return spec


def sweep(tmp_path: Path, spec: dict, *extra: str, ray_tmp: Path) -> subprocess.CompletedProcess:
    path = tmp_path / f"{spec['name']}.yaml"
    path.write_text(yaml.safe_dump(spec))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_TMPDIR": str(ray_tmp)}
    return subprocess.run([sys.executable, "-m", "study", "sweep", str(path), *extra],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
                          check=False)


def trial_runs(uri: str, study: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(study)
    return client, client.search_runs([exp.experiment_id], "tags.`gradstudy.kind` = 'trial'")


@pytest.mark.slow
def test_lost_worker_node_trials_finish_elsewhere_from_checkpoints(tmp_path, short_tmp,
                                                                   monkeypatch):
    """Four trials on two worker nodes; one node goes away once its trials have checkpointed.
    The lost node's trials must finish on the other node, continuing from their checkpoints,
    each still one MLflow run. (No replacement node joins: Ray adds nodes only from the main
    thread, which the study occupies.)"""
    import json

    import ray
    from mlflow.exceptions import MlflowException
    from ray._private.node import Node
    from ray.cluster_utils import Cluster

    from study.spec import parse_spec
    from study.tune import run_study

    # Ray registers a node's atexit hook before the node sets `all_processes`; a node torn down
    # mid-start-up (as here) then raises AttributeError at interpreter exit, after pytest's
    # summary. A class-level default (read only by such nodes) keeps the exit quiet.
    if not hasattr(Node, "all_processes"):
        Node.all_processes = {}
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    spec = parse_spec(spec_dict("lostnode", tmp_path, epochs=5, lr=[0.02, 0.04, 0.06, 0.08],
                                families={"faulty": {"options": {"sleep_s": 0.15}}},
                                # every epoch a checkpoint: "epoch 2 logged" then implies the
                                # epoch-1 checkpoint was reported (with the default period the
                                # node could go while the first checkpoint was being written)
                                checkpoint={"every_s": 0}))
    uri = spec.tracking.uri
    cluster = Cluster(initialize_head=True,
                      head_node_args={"num_cpus": 0, "temp_dir": str(short_tmp)})
    nodes = [cluster.add_node(num_cpus=2) for _ in range(2)]
    cluster.wait_for_nodes()
    lost: dict = {}

    def remove_a_node_mid_way():
        """Once a node runs a trial that has checkpointed and has epochs to go, remove it.
        Every trial it ran unfinished must finish elsewhere; those past epoch 1 must continue
        from their checkpoints. (Not "once all four trials are mid-way": under load the
        trials' workers start far enough apart that such a moment may never come.)"""
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and not lost:
            time.sleep(0.5)
            try:
                _, runs = trial_runs(uri, "lostnode")
            except (AttributeError, MlflowException):  # store or experiment not created yet
                continue
            # epoch >= 2 logged: the checkpoint of epoch 1 was reported (metrics are flushed to
            # MLflow just before each checkpoint is reported, and every epoch checkpoints here)
            mid_way = [r for r in runs if r.data.tags.get("status") == "running"
                       and 2 <= r.data.metrics.get("epoch", 0) <= spec.epochs - 2]
            victim = next((n for n in nodes if any(r.data.tags.get("node_id") == n.node_id
                                                   for r in mid_way)), None)
            if victim is None:
                continue
            cluster.remove_node(victim)
            # Which of its trials were lost is read after the node is gone (a trial may
            # have finished between the observation above and the removal).
            lost["at"] = int(time.time())
            _, runs = trial_runs(uri, "lostnode")
            lost.update(node=victim.node_id,
                        trials={r.data.tags["trial_id"]: int(r.data.metrics.get("epoch", 0))
                                for r in runs if r.data.tags.get("node_id") == victim.node_id
                                and r.data.tags.get("status") != "finished"})

    remover = threading.Thread(target=remove_a_node_mid_way, daemon=True)
    remover.start()
    sigint_before = signal.getsignal(signal.SIGINT)
    try:
        result = run_study(spec, None, address=cluster.address)
        # Tune installs its own Ctrl-C handler for the sweep; after it, Ctrl-C must stop the
        # program again (the report comes next), so the sweep puts the old handler back.
        assert signal.getsignal(signal.SIGINT) is sigint_before
    finally:
        remover.join(timeout=5)
        ray.shutdown()
        cluster.shutdown()

    assert lost.get("trials"), "the node was never removed mid-way"
    assert result.statuses == {"finished": 4}, result.statuses
    client, runs = trial_runs(uri, "lostnode")
    assert len(runs) == 4 and len({r.data.tags["trial_id"] for r in runs}) == 4
    for run in runs:
        trial_id = run.data.tags["trial_id"]
        assert run.data.tags["status"] == "finished"
        history = client.get_metric_history(run.info.run_id, "epoch")
        assert sorted(int(m.value) for m in history) == [1, 2, 3, 4, 5], "each epoch once"
        if trial_id in lost["trials"]:
            assert run.data.tags["node_id"] != lost["node"], "finished on another node"
            (result_file,) = (tmp_path / "results" / "lostnode").glob(f"*_{trial_id}/result.json")
            reports = [json.loads(line) for line in result_file.read_text().splitlines()]
            after = [r["epoch"] for r in reports if r["timestamp"] > lost["at"]]
            assert after and after[-1] == 5, f"{trial_id} did not finish: {reports}"
            if lost["trials"][trial_id] >= 2:   # had a checkpoint when its node went away
                assert after[0] > 1, \
                    f"{trial_id} restarted from scratch instead of its checkpoint: {reports}"
    assert max(lost["trials"].values()) >= 2, "no lost trial had a checkpoint"


@pytest.mark.slow
def test_trial_that_raises_is_recorded_as_errored(tmp_path, short_tmp):
    spec = spec_dict("raises", tmp_path, epochs=2, max_failures=1,
                     families={"faulty": {"options": {"fail_after": [0, 5]}}})
    proc = sweep(tmp_path, spec, ray_tmp=short_tmp)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "1 errored" in proc.stdout and "1 finished" in proc.stdout, proc.stdout[-2000:]

    client, runs = trial_runs(spec["tracking"]["uri"], "raises")
    by_option = {r.data.params["opt.fail_after"]: r for r in runs}
    assert set(by_option) == {"0", "5"} and len(runs) == 2
    bad, good = by_option["5"], by_option["0"]
    assert bad.data.tags["status"] == "errored" and bad.info.status == "FAILED"
    assert good.data.tags["status"] == "finished" and good.info.status == "FINISHED"
    (parent,) = client.search_runs([bad.info.experiment_id], "tags.`gradstudy.kind` = 'study'")
    assert parent.info.status == "FINISHED", "the study itself finished"

    report = tmp_path / "reports" / "raises"
    text = "\n".join(p.read_text(errors="replace") for p in report.rglob("*")
                     if p.suffix in {".md", ".csv"})
    listing = sorted(report.rglob("*"))
    assert "errored" in text, f"the report does not list the errored trial: {listing}"


def test_unreachable_tracking_server_stops_the_sweep_before_any_trial(tmp_path, short_tmp,
                                                                      unused_port):
    port = unused_port          # nothing listens here
    spec = spec_dict("nomlflow", tmp_path)
    start = time.monotonic()
    proc = sweep(tmp_path, spec, "--tracking-uri", f"http://127.0.0.1:{port}", ray_tmp=short_tmp)
    elapsed = time.monotonic() - start
    assert proc.returncode != 0
    assert "tracking.uri" in proc.stderr and f"127.0.0.1:{port}" in proc.stderr, proc.stderr
    assert elapsed < 60, f"took {elapsed:.0f}s to give up"
    assert not (tmp_path / "results").exists(), "trial results written"
    assert not list(short_tmp.iterdir()), "a Ray runtime was started"
