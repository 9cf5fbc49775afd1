"""A throwaway PostgreSQL cluster for the tracking-server tests: the database a cluster's MLflow
server uses (cluster.yaml), started in a temp folder on 127.0.0.1 and removed afterwards.
Not collected itself.

``initdb`` and ``postgres`` refuse to run as root, so as root they run as the ``postgres``
user (or ``nobody``) through ``runuser``. fsync is off: the tests prove that concurrent
writers lose nothing through the server, not that PostgreSQL survives a power cut.
"""
from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

DB = "mlflow"
USER = "postgres"   # the cluster's superuser (trust auth, 127.0.0.1 only)


def binaries() -> Path | None:
    """The folder with initdb/pg_ctl: on PATH, or Debian's /usr/lib/postgresql/<v>/bin."""
    found = shutil.which("initdb")
    if found:
        return Path(found).parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                      key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0)
    return Path(versions[-1]).parent if versions else None


def run_as() -> str | None:
    """The account to run PostgreSQL as when we are root (None: run as ourselves)."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            pwd.getpwnam(name)
            return name
        except KeyError:
            continue
    raise RuntimeError("running as root and no 'postgres' or 'nobody' user to run initdb as")


class Postgres:
    """One PostgreSQL cluster on ``127.0.0.1:port`` with the database ``mlflow``."""

    def __init__(self, port: int):
        self.bin = binaries()
        if self.bin is None:
            raise FileNotFoundError("no PostgreSQL server binaries (apt-get install postgresql)")
        self.user = run_as()
        self.port = port
        self.folder = Path(tempfile.mkdtemp(prefix="gs-pg-", dir="/tmp"))
        self.data = self.folder / "data"
        self.log = self.folder / "postgres.log"
        self.uri = f"postgresql://{USER}@127.0.0.1:{port}/{DB}"

    def _cmd(self, *args: str) -> list[str]:
        runuser = shutil.which("runuser") or "runuser"
        return [runuser, "-u", self.user, "--", *args] if self.user else list(args)

    def _run(self, *args: str, timeout: float = 120) -> None:
        done = subprocess.run(self._cmd(*args), cwd=self.folder, capture_output=True,
                              text=True, timeout=timeout)
        if done.returncode:
            log = self.log.read_text() if self.log.exists() else ""
            raise RuntimeError(f"{args[0]} failed: {done.stdout}{done.stderr}{log}"[-3000:])

    def start(self) -> Postgres:
        if self.user:
            info = pwd.getpwnam(self.user)
            os.chown(self.folder, info.pw_uid, info.pw_gid)
        self._run(str(self.bin / "initdb"), "-D", str(self.data), "-U", USER,
                  "--auth=trust", "--encoding=UTF8", "--no-sync")
        options = (f"-p {self.port} -c listen_addresses=127.0.0.1 "
                   f"-c unix_socket_directories={self.folder} -c fsync=off "
                   "-c synchronous_commit=off -c full_page_writes=off -c max_connections=200")
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.log),
                  "-o", options, "-w", "-t", "90", "start")
        with self.connect("postgres") as conn:
            conn.execute(f"CREATE DATABASE {DB}")
        return self

    def connect(self, database: str = DB):
        """A psycopg (3) connection straight to the database (not through MLflow)."""
        import psycopg

        deadline = time.monotonic() + 30
        while True:
            try:
                return psycopg.connect(host="127.0.0.1", port=self.port, user=USER,
                                       dbname=database, autocommit=True)
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    def query(self, sql: str, *args) -> list[tuple]:
        with self.connect() as conn:
            return conn.execute(sql, args).fetchall()

    def stop(self) -> None:
        """Stop this cluster (pg_ctl on its own data folder) and remove the folder."""
        if self.data.exists():
            subprocess.run(self._cmd(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m",
                                     "fast", "-w", "stop"), capture_output=True, timeout=60)
        shutil.rmtree(self.folder, ignore_errors=True)
