"""Fixtures of the Ray tests: a real local Ray (head on 127.0.0.1, 2 CPUs), a dense index over the first
SciFact documents (one index and a 4-shard copy of it), and the service deployed on Ray Serve.

Every test here is skipped, with the reason, when Ray is not installed. (This folder is not named
``ray``: with ``tests/`` on ``sys.path`` a ``tests/ray`` folder would import as an empty ``ray``
namespace package when the real one is missing, and nothing would be skipped.)
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
from cluster_support import RAY_MISSING, free_port, wait_ready, write_pipelines

N_DOCS = 200

os.environ.setdefault("RAY_SERVE_QUEUE_LENGTH_RESPONSE_DEADLINE_S", "2.0")  # probes are slow on 2 loaded cores
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="module")
def ray_head() -> Iterator[Any]:
    """A local Ray head on 127.0.0.1 with 2 CPUs, no dashboard (stopped after each module, so the rest
    of the suite runs without Ray's processes)."""
    ray = pytest.importorskip("ray", reason=RAY_MISSING)
    from streamrank.service.ray_serve import start_ray
    from streamrank.service.ray_settings import RaySettings

    start_ray(RaySettings(namespace="streamrank-test"), num_cpus=2, num_gpus=0, log_to_driver=False)
    yield ray
    from ray import serve

    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="session")
def docs(scifact_head: Any) -> list[Any]:
    return scifact_head(N_DOCS)


@pytest.fixture(scope="session")
def minilm() -> Any:
    from streamrank.models import MINILM, load_sentence_encoder

    return load_sentence_encoder(MINILM, "cpu")


@pytest.fixture(scope="session")
def corpus(tmp_path_factory: pytest.TempPathFactory, docs: list[Any], minilm: Any) -> SimpleNamespace:
    """An index folder with the store, a flat dense index and its 4-shard split (vectors shared)."""
    from streamrank.compose import load_pipeline
    from streamrank.models import MINILM

    root = tmp_path_factory.mktemp("ray-corpus")
    ns = write_pipelines(root / "pipelines")
    ns.index = root / "index"
    for path in (ns.dense, ns.sharded):
        pipeline = load_pipeline(path, index_dir=ns.index)
        pipeline.context.shared(("sentence-encoder", MINILM), lambda: minilm)
        pipeline.index(docs)
        pipeline.close()
    return ns


@pytest.fixture(scope="module")
def served(ray_head: Any, corpus: SimpleNamespace) -> Iterator[SimpleNamespace]:
    """The service on Ray Serve: 2 stateless ingress replicas, the writer, ``dense`` with 2 replicas,
    ``dense-s4`` with 1 (and 4 shard deployments of 1 replica each), and ``rerank`` (dense, then E2Rank)
    as a first-stage deployment and a reranker deployment."""
    from streamrank.service.ray_serve import deploy, undeploy
    from streamrank.service.ray_settings import RaySettings
    from streamrank.service.settings import load_settings

    ray_settings = RaySettings(
        namespace="streamrank-test",
        replicas=1,
        num_cpus=0.25,
        ingress={"replicas": 2, "num_cpus": 0.05},
        writer={"num_cpus": 0.25},
        shard={"num_cpus": 0.05},
        pipelines={"dense": {"replicas": 2}, "rerank": {"rerankers": {"replicas": 1, "num_cpus": 0.25}}},
    )
    settings = load_settings(
        env={},
        pipelines=[str(corpus.dense), str(corpus.sharded), str(corpus.reranked)],
        index_dir=str(corpus.index),
        port=free_port(),
        torch_threads=1,
        max_batch_size=8,
        batch_window_ms=20,
        ray=ray_settings,
    )
    started = time.monotonic()
    url = deploy(settings)
    ready = wait_ready(url)
    yield SimpleNamespace(url=url, settings=settings, ready=ready, startup_s=time.monotonic() - started)
    undeploy(settings)
