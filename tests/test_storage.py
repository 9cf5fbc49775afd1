"""The sweep's storage: local folders and URIs go through one pyarrow filesystem path, so the
resume state lands beside Tune's experiment wherever that is (s3:// on a cluster)."""
import pytest

from study.tune import STATE_FILE, Storage


def test_state_round_trip_and_set_aside_on_a_local_folder(tmp_path):
    store = Storage(str(tmp_path / "results"), "s")
    assert store.study_uri == f"{tmp_path}/results/s" and store.read_state() is None
    store.write_state({"parent_run_id": "p1"})
    assert (tmp_path / "results" / "s" / STATE_FILE).exists()
    assert store.read_state() == {"parent_run_id": "p1"}
    store.set_aside("stamp")
    assert not store.exists() and (tmp_path / "results" / "s.stamp" / STATE_FILE).exists()


def test_uris_keep_their_scheme(tmp_path):
    store = Storage(f"file://{tmp_path}/r/", "s")
    assert store.study_uri == f"file://{tmp_path}/r/s"     # not "file:/..." as Path() would make
    store.write_state({"x": 1})
    assert (tmp_path / "r" / "s" / STATE_FILE).exists() and store.read_state() == {"x": 1}


def test_relative_folders_are_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert Storage("results", "s").study_uri == f"{tmp_path}/results/s"


def test_a_trial_finds_its_run_by_the_id_in_its_files_without_a_search(tmp_path, monkeypatch):
    """A real sqlite store with other trials' runs in it: the trial's first start creates its
    run and keeps the id in its files; a restart (resume, retry) opens that run by key.
    ``search_runs`` is never called, so the lookup costs the same however many runs the
    experiment holds."""
    import ray.tune
    from mlflow.tracking import MlflowClient

    from study.spec import parse_spec
    from study.storage import TrialFiles
    from study.tracking import TrialRun, open_store, study_parent
    from study.trainable import _resume

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    exp = open_store(uri, "s")
    parent = study_parent(uri, exp, "s", None, params={}, artifacts={})
    for i in range(30):
        TrialRun(uri, exp, parent, f"other_{i}", {"arm": "m/f/v", "lr": 0.1, "batch_size": 8},
                 tags={}, dataset={"name": "d", "digest": "0", "source": "here"})
    spec = parse_spec({"name": "s", "dataset": {"name": "mnist1d", "size": 600,
                                                "root": str(tmp_path)},
                       "models": [{"name": "mlp", "widths": [8]}], "epochs": 1, "lr": [0.1],
                       "batch_size": [32], "families": {"sgd": None}})
    cfg = spec.trial_config(spec.trials()[0])
    tracking = {"uri": uri, "experiment_id": exp, "parent_run_id": parent}
    searches = []
    monkeypatch.setattr(MlflowClient, "search_runs",
                        lambda self, *a, **k: searches.append(a) or [])
    monkeypatch.setattr(ray.tune, "get_checkpoint", lambda: None)
    with pytest.raises(RuntimeError, match="cannot be reached from this node"):
        TrialFiles(Storage(str(tmp_path / "results"), "s"), "t_00001")   # no study folder
    storage = Storage(str(tmp_path / "results"), "s")
    storage.write_state({"parent_run_id": parent})          # as the driver does first
    files = TrialFiles(storage, "t_00001")

    state, first = _resume(files, tracking, "t_00001", cfg, {"node_id": "n1"})
    assert state is None and files.run_id() == first.run_id
    first.log({"epoch": 1}, 5)
    first.end("interrupted")
    state, again = _resume(files, tracking, "t_00001", cfg, {"node_id": "n2"})
    assert again.run_id == first.run_id
    assert again.logged == {"epoch": 5}          # steps already logged are not logged twice
    assert MlflowClient(uri).get_run(again.run_id).data.tags["node_id"] == "n2"
    assert searches == []


def test_metrics_wait_for_a_flush(tmp_path):
    """A trial's metrics reach the store in one batch at its checkpoints and at its end."""
    from mlflow.tracking import MlflowClient

    from study.tracking import TrialRun, open_store, study_parent

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    exp = open_store(uri, "s")
    parent = study_parent(uri, exp, "s", None, params={}, artifacts={})
    run = TrialRun(uri, exp, parent, "t", {"arm": "m/f/v", "lr": 0.1, "batch_size": 8},
                   tags={}, dataset={"name": "d", "digest": "0", "source": "here"})
    client = MlflowClient(uri)
    for step in range(3):
        run.log({"epoch": step + 1, "loss": 1.0 / (step + 1)}, step)
    assert client.get_run(run.run_id).data.metrics == {}
    run.flush()
    assert [m.step for m in client.get_metric_history(run.run_id, "loss")] == [0, 1, 2]
    run.log({"epoch": 4}, 3)
    run.end("finished")
    assert client.get_run(run.run_id).data.metrics["epoch"] == 4


def test_a_sqlite_store_is_opened_in_write_ahead_log_mode(tmp_path, caplog):
    """``open_store`` switches a sqlite store to WAL (fewer syncs per trial write; readers do
    not block writers): a new store, and an old one in the default journal mode with its runs
    kept. A store another process is reading stays as it is, with a warning, and opens."""
    import sqlite3

    from mlflow.tracking import MlflowClient

    from study.tracking import open_store

    def mode(db):
        con = sqlite3.connect(db)
        try:
            return con.execute("PRAGMA journal_mode").fetchone()[0]
        finally:
            con.close()

    new = tmp_path / "new.db"
    open_store(f"sqlite:///{new}", "s")
    assert mode(new) == "wal"

    old = tmp_path / "old.db"
    client = MlflowClient(f"sqlite:///{old}")              # MLflow's own default: 'delete'
    run = client.create_run(client.create_experiment("s")).info.run_id
    assert mode(old) == "delete"
    open_store(f"sqlite:///{old}", "s")
    assert mode(old) == "wal" and MlflowClient(f"sqlite:///{old}").get_run(run)

    held = tmp_path / "held.db"
    MlflowClient(f"sqlite:///{held}").create_experiment("s")
    lock = sqlite3.connect(held, isolation_level=None)
    lock.execute("BEGIN")                     # a reader mid-transaction: the switch waits
    lock.execute("SELECT COUNT(*) FROM runs").fetchone()   # for it (5 s), then gives up
    try:
        with caplog.at_level("WARNING", logger="study.tracking"):
            exp = open_store(f"sqlite:///{held}", "s")
    finally:
        lock.execute("ROLLBACK")
        lock.close()
    assert exp and mode(held) == "delete"
    assert "stays in its journal mode" in caplog.text


DEFAULT_STUDY_TRIALS = 186
FOLDER_BYTES_PER_TRIAL = 50e6 / DEFAULT_STUDY_TRIALS   # the default study's folder <= 50 MB
# The issue asks <= 5 KB: the default study stores 4.8 KB a trial (README, Benchmarks), with
# Tune's cached JSON compact (LeanTrialState). Here every trial keeps a checkpoint (~2 KB more
# in Tune's record); Tune's metric statistics coming back would add ~13 KB a trial, a
# checkpoint kept per epoch ~2 KB an epoch.
STATE_BYTES_PER_TRIAL = 10e3


@pytest.mark.slow
def test_a_study_stores_little_per_trial(tmp_path, short_tmp):
    """A small real sweep (6 trials of 6 epochs, checkpointing every epoch): per trial, the
    Tune folder stays within the default study's 50 MB / 186 trials and Tune's experiment
    state within 10 KB; each trial keeps one checkpoint file, whatever its number of epochs."""
    import yaml
    from sweep_store import run_sweep

    spec = {"name": "small", "dataset": {"name": "mnist1d", "size": 600,
                                         "root": str(tmp_path / "data")},
            "models": [{"name": "mlp", "widths": [100, 100]}], "epochs": 6,
            "lr": [0.01, 0.1, 1.0], "batch_size": [32, 128],
            "families": {"sgd": {"variants": ["momentum"]}},
            "measure": {"points": 2, "batches": 2}, "checkpoint": {"every_s": 0},
            "tracking": {"uri": "sqlite:///mlflow.db"}, "storage": "results"}
    (tmp_path / "small.yaml").write_text(yaml.safe_dump(spec))
    proc = run_sweep(tmp_path, tmp_path / "small.yaml", "--no-report", ray_tmp=short_tmp)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    folder = tmp_path / "results" / "small"
    trials = 6
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    (state,) = folder.glob("experiment_state*.json")
    print(f"per trial: folder {size / trials / 1e3:.1f} KB, "
          f"experiment state {state.stat().st_size / trials / 1e3:.2f} KB")
    assert size / trials <= FOLDER_BYTES_PER_TRIAL
    assert state.stat().st_size / trials <= STATE_BYTES_PER_TRIAL
    assert len(list(folder.glob("*/checkpoint_*"))) == trials, "one checkpoint kept a trial"
    assert len(list((folder / "trials").glob("*.run_id"))) == trials
