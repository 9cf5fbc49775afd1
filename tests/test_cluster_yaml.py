"""The cluster launchers (cluster.yaml for AWS, cluster-gcp.yaml for GCP) checked offline.

`ray up` is the only real test of a cluster file and needs a cloud account; what can be checked
without one is checked here: Ray's own schema validation, the GPU worker shape, the image, that
nothing we start listens on every interface, that the head's MLflow server runs on its own
PostgreSQL, and that no credential ends up in the repository. (tests/test_tracking_server.py runs
the head's PostgreSQL command for real.)
"""
from __future__ import annotations

import copy
import re
import shlex
from pathlib import Path

import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_FILES = ["cluster.yaml", "cluster-gcp.yaml"]
SECRET_PATTERNS = [r"aws_secret", r"private_key", r"BEGIN RSA", r"BEGIN OPENSSH",
                   r"BEGIN .*PRIVATE",
                   r"AKIA[0-9A-Z]{16}", r"aws_access_key_id", r"client_secret"]
EVERY_INTERFACE = {"0.0.0.0", "::", "[::]", "*"}


def load(name: str) -> dict:
    return yaml.safe_load((ROOT / name).read_text())


def commands(cfg: dict) -> list[str]:
    keys = ["initialization_commands", "setup_commands", "head_setup_commands",
            "worker_setup_commands", "head_start_ray_commands", "worker_start_ray_commands"]
    out = [c for k in keys for c in cfg.get(k) or []]
    for node in cfg["available_node_types"].values():
        out += node.get("initialization_commands", []) + node.get("worker_setup_commands", [])
    return out


def flag_values(command: str, flag: str) -> list[str]:
    """Values given to ``flag`` (``--flag V`` or ``--flag=V``) in a shell command line."""
    words = shlex.split(command.replace(";", " ; "), posix=True)
    values = []
    for i, w in enumerate(words):
        if w == flag and i + 1 < len(words):
            values.append(words[i + 1])
        elif w.startswith(flag + "="):
            values.append(w.split("=", 1)[1])
    return values


@pytest.mark.parametrize("name", CLUSTER_FILES)
def test_ray_accepts_the_cluster_file(name):
    validate_config(prepare_config(load(name)))


def test_validation_is_a_real_check():
    cfg = load("cluster.yaml")
    cfg["available_node_types"]["gpu_worker"]["resources"] = {"GPU": "one"}
    with pytest.raises(Exception, match="GPU|resources|one"):
        validate_config(prepare_config(cfg))
    cfg = load("cluster.yaml")
    cfg["head_start_ray_comands"] = cfg.pop("head_start_ray_commands")   # a typo
    with pytest.raises(Exception, match="head_start_ray_comands"):
        validate_config(prepare_config(copy.deepcopy(cfg)))


@pytest.mark.parametrize("name", CLUSTER_FILES)
def test_gpu_worker_type_declares_one_gpu(name):
    cfg = load(name)
    head = cfg["head_node_type"]
    workers = {k: v for k, v in cfg["available_node_types"].items() if k != head}
    gpu_types = {k: v for k, v in workers.items() if v.get("resources", {}).get("GPU")}
    assert gpu_types, f"{name}: no worker type declares a GPU"
    for key, node in gpu_types.items():
        assert node["resources"]["GPU"] == 1, key
        assert node["resources"].get("CPU", 0) >= 1, key
        assert 0 <= node["min_workers"] <= node["max_workers"], key
    assert not cfg["available_node_types"][head].get("resources", {}).get("GPU"), \
        "the head is a CPU node"


@pytest.mark.parametrize("name", CLUSTER_FILES)
def test_image_is_the_plain_ray_image(name):
    cfg = load(name)
    images = [cfg["docker"]["image"]] + [
        img for node in cfg["available_node_types"].values()
        for img in [node.get("docker", {}).get("worker_image")] if img]
    images += [cfg["docker"][k] for k in ("head_image", "worker_image") if k in cfg["docker"]]
    for image in images:
        assert "ray-ml" not in image, image
        assert image.startswith("rayproject/ray:2.60.0-py311-gpu"), image


@pytest.mark.parametrize("name", CLUSTER_FILES)
def test_head_starts_ray_and_mlflow_on_a_private_address(name):
    cfg = load(name)
    start = cfg["head_start_ray_commands"]
    assert any("ray start --head" in c for c in start)
    mlflow = [c for c in start if "mlflow server" in c]
    assert len(mlflow) == 1, "the head starts one MLflow tracking server"
    hosts = flag_values(mlflow[0], "--host")
    assert hosts and all(h not in EVERY_INTERFACE for h in hosts), hosts
    assert "hostname -I" in mlflow[0], "bound to the head's private IP"
    assert "--artifacts-destination" in mlflow[0] and "--port 5000" in mlflow[0]
    for command in commands(cfg):
        for flag in ("--host", "--dashboard-host", "--node-ip-address"):
            for value in flag_values(command, flag):
                assert value not in EVERY_INTERFACE, (flag, command)


@pytest.mark.parametrize("name", CLUSTER_FILES)
def test_head_runs_mlflow_on_its_own_postgresql(name):
    """The cluster's store is PostgreSQL (concurrent writers), installed from the OS packages
    on the head, started before the server, on a Unix socket only (no TCP port to protect)."""
    cfg = load(name)
    setup = " ".join(cfg["head_setup_commands"])
    assert "apt-get install" in setup and "postgresql" in setup
    assert "gradstudy[cluster]" in setup, "the head needs the PostgreSQL driver (psycopg)"
    start = cfg["head_start_ray_commands"]
    server = next(i for i, c in enumerate(start) if "mlflow server" in c)
    postgres = [i for i, c in enumerate(start) if "pg_ctl" in c and "initdb" in c]
    assert postgres and postgres[0] < server, "PostgreSQL starts before the MLflow server"
    pg = start[postgres[0]]
    assert "listen_addresses=''" in pg and "unix_socket_directories=" in pg, pg
    assert "--auth-local=peer" in pg and "trust" not in pg, pg
    stores = flag_values(start[server], "--backend-store-uri")
    assert len(stores) == 1 and stores[0].startswith("postgresql://"), stores
    assert "?host=$HOME/gradstudy-pg" in stores[0], "the socket folder PostgreSQL listens in"
    assert "MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false" in start[server]


@pytest.mark.parametrize("name", CLUSTER_FILES)
def test_nodes_know_the_tracking_server_address(name):
    """What a cluster study sets as ``tracking.uri``: http://<head-private-ip>:5000."""
    setup = " ".join(load(name)["setup_commands"])
    assert "GRADSTUDY_TRACKING_URI=http://$(hostname -I" in setup and ":5000" in setup


def test_the_cluster_extra_has_the_postgresql_driver():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    for extra in ("cluster", "test"):
        assert any(d.startswith("psycopg") for d in extras[extra]), extra
@pytest.mark.parametrize("name", CLUSTER_FILES)
def test_nodes_install_this_project_and_know_the_storage(name):
    cfg = load(name)
    mounted = {remote: local for remote, local in cfg["file_mounts"].items()}
    assert mounted.get("~/gradstudy") == "."
    setup = " ".join(cfg["setup_commands"])
    assert "pip install" in setup and "-e ~/gradstudy" in setup
    assert "GRADSTUDY_STORAGE" in setup


@pytest.mark.parametrize("name", CLUSTER_FILES)
def test_auth_is_the_ssh_user_only(name):
    assert load(name)["auth"] == {"ssh_user": "ubuntu"}


def test_no_secrets_in_the_repository_yaml():
    files = [p for p in ROOT.rglob("*.y*ml") if p.suffix in {".yaml", ".yml"}
             and not any(part.startswith(".") or part in {"node_modules", "results", "data"}
                         for part in p.relative_to(ROOT).parts[:-1])]
    assert {f"{n}" for n in CLUSTER_FILES} <= {p.name for p in files}
    for path in files:
        text = path.read_text(errors="replace")
        for pattern in SECRET_PATTERNS:
            assert not re.search(pattern, text, re.IGNORECASE), f"{path}: matches {pattern!r}"
