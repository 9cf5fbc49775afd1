"""The sweep's storage: local folders and URIs go through one pyarrow filesystem path, so the
resume state lands beside Tune's experiment wherever that is (s3:// on a cluster)."""
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
