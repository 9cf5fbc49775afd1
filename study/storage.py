"""Where a study lives: Tune's experiment folder (a local folder or a ``s3://`` / ``gs://``
URI), the sweep's state file beside it and each trial's MLflow run id, all through pyarrow's
filesystems so every kind of storage works the same.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from study.spec_values import SpecError

STATE_FILE = "gradstudy.json"
TRIALS_DIR = "trials"        # <study>/trials/<trial id>.run_id


class Storage:
    """Where Tune keeps a study (a local folder or a ``s3://`` / ``gs://`` URI) and the
    sweep's state file beside it, through pyarrow's filesystems so both work the same."""

    def __init__(self, root: str, study: str):
        import pyarrow.fs

        self.root_uri = root if "://" in root else str(Path(root).resolve())
        self.study_uri = self.root_uri.rstrip("/") + "/" + study
        self.fs, self.path = pyarrow.fs.FileSystem.from_uri(
            self.study_uri if "://" in self.study_uri else "file://" + self.study_uri)

    def check_writable(self) -> None:
        """Write a probe file where the study will live, before anything starts; leave no
        trace (folders it had to create are removed again)."""
        import pyarrow.fs

        missing = None
        folder = self.path
        while folder and self.fs.get_file_info(folder).type == pyarrow.fs.FileType.NotFound:
            missing, folder = folder, folder.rsplit("/", 1)[0]
        probe = f"{self.path}/.gradstudy-write-probe"
        try:
            self.fs.create_dir(self.path, recursive=True)
            with self.fs.open_output_stream(probe) as f:
                f.write(b"ok")
            self.fs.delete_file(probe)
            if missing:
                self.fs.delete_dir(missing)
        except OSError as err:
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise SpecError(f"storage: cannot write to {self.study_uri} ({reason})") from None

    def exists(self) -> bool:
        import pyarrow.fs

        return self.fs.get_file_info(self.path).type != pyarrow.fs.FileType.NotFound

    def read_state(self) -> dict[str, Any] | None:
        try:
            with self.fs.open_input_stream(f"{self.path}/{STATE_FILE}") as f:
                return json.loads(f.read().decode())
        except (FileNotFoundError, OSError):
            return None

    def write_state(self, state: dict[str, Any]) -> None:
        self.fs.create_dir(self.path, recursive=True)
        with self.fs.open_output_stream(f"{self.path}/{STATE_FILE}") as f:
            f.write(json.dumps(state, indent=1).encode())

    def set_aside(self, stamp: str) -> None:
        """--fresh: keep the old sweep's folder, renamed, instead of deleting anything."""
        if self.exists():
            self.fs.move(self.path, f"{self.path}.{stamp}")


class TrialFiles:
    """One trial's own files: its MLflow run id, written when the run is created, so a trial
    (resumed, or retried after a crash) finds its run again by key, never by a search over the
    experiment's runs."""

    def __init__(self, storage: Storage, trial_id: str):
        self.fs = storage.fs
        self.base = f"{storage.path}/{TRIALS_DIR}/{trial_id}"
        if storage.read_state() is None:   # the driver wrote it before any trial started
            raise RuntimeError(
                f"storage: {storage.study_uri} cannot be reached from this node (a local path "
                "on a multi-node cluster?): give --storage a place every node reaches (s3://, "
                "gs://, a shared file system)")

    def run_id(self) -> str | None:
        try:
            with self.fs.open_input_stream(self.base + ".run_id") as f:
                return f.read().decode().strip() or None
        except (FileNotFoundError, OSError):
            return None

    def set_run_id(self, run_id: str) -> None:
        """Atomically where the filesystem can (a rename): never a half-written id."""
        self.fs.create_dir(self.base.rsplit("/", 1)[0], recursive=True)
        tmp = f"{self.base}.run_id.tmp"
        with self.fs.open_output_stream(tmp) as f:
            f.write(run_id.encode())
        self.fs.move(tmp, self.base + ".run_id")
