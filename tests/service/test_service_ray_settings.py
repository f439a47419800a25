"""The Ray back end's settings and what ``streamrank serve`` does without ``--ray``: Ray is never imported.
(The Ray deployments themselves are tested against a real local Ray in tests/cluster/.)"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from streamrank.errors import ConfigError
from streamrank.service.batching import BatchPolicy
from streamrank.service.settings import load_settings

NO_RAY = r"""
import sys
from fastapi.testclient import TestClient
import streamrank.service.app as app_module
from streamrank import cli
from streamrank.service.app import create_app
from streamrank.service.settings import load_settings

settings = load_settings(env={}, pipelines=["bm25"], index_dir=sys.argv[1], warmup=False, recover=True)
with TestClient(create_app(settings)) as client:  # the lifespan runs: pipelines load (and fail: no index)
    for _ in range(200):
        if client.get("/readyz").json()["status"] != "loading":
            break
served = []
app_module.serve = lambda **kw: served.append(kw)  # the CLI's in-process path, without binding a port
assert cli.main(["serve", "-p", "bm25", "--index-dir", sys.argv[1]]) == 0 and served
loaded = sorted(m for m in sys.modules if m == "ray" or m.startswith("ray."))
print("RAY MODULES", loaded)
sys.exit(1 if loaded else 0)
"""


def test_serve_without_ray_never_imports_ray(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-c", NO_RAY, str(tmp_path / "index")], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "RAY MODULES []" in result.stdout


def test_ray_table_in_the_settings_file(tmp_path: Path) -> None:
    config = tmp_path / "service.toml"
    config.write_text(
        'pipelines = ["dense"]\nmax_batch_size = 16\nbatch_window_ms = 8\n'
        '[ray]\naddress = "auto"\nreplicas = 2\nnum_cpus = 0.5\n'
        "[ray.pipelines.first]\nreplicas = 1\nnum_gpus = 1\n"
        "[ray.pipelines.dense]\nautoscaling = {min_replicas = 1, max_replicas = 4}\n"
    )
    settings = load_settings(config, env={})
    assert settings.ray is not None and settings.ray.address == "auto"
    first, dense, other = (settings.ray.deployment(n) for n in ("first", "dense", "bm25"))
    assert (first.replicas, first.num_gpus, first.num_cpus) == (1, 1.0, 0.5)
    assert dense.autoscaling is not None and dense.autoscaling.max_replicas == 4 and dense.replicas == 2
    assert (other.replicas, other.num_gpus) == (2, 0.0)
    assert BatchPolicy.of(settings) == BatchPolicy(max_batch=16, window_s=0.008, workers=2)
    assert BatchPolicy.of(settings.model_copy(update={"batching": False})) == BatchPolicy(1, 0.0, 2)
    assert load_settings(env={}).ray is None  # no table: in process


def test_ray_settings_from_the_environment_and_errors(tmp_path: Path) -> None:
    settings = load_settings(env={"STREAMRANK_RAY": '{"replicas": 3, "shard": {"replicas": 2, "num_cpus": 0.1}}'})
    assert settings.ray is not None and settings.ray.replicas == 3
    assert (settings.ray.shard.replicas, settings.ray.shard.num_cpus, settings.ray.ingress.replicas) == (2, 0.1, 1)
    with pytest.raises(ConfigError, match="exactly one replica"):
        load_settings(env={}, ray={"writer": {"replicas": 2}})
    with pytest.raises(ConfigError, match="replicass"):
        load_settings(env={"STREAMRANK_RAY": '{"replicass": 3}'})
    with pytest.raises(ConfigError, match="below min_replicas"):
        load_settings(env={}, ray={"autoscaling": {"min_replicas": 3, "max_replicas": 2}})
