"""The service on a real local Ray (head on 127.0.0.1, 2 CPUs, torch threads 1): the same rankings as in
process through Ray Serve with 2 replicas and through a 4-shard index served by shard deployments;
batching with the service's own bounds; a pipeline replica killed under load; a shard replica replaced."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace
from typing import Any

import pytest
from cluster_support import RAY_MISSING, local_pipeline

pytest.importorskip("ray.serve", reason=RAY_MISSING)

import httpx  # noqa: E402
import ray  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from streamrank.index.sharded import shard_of  # noqa: E402
from streamrank.service.app import create_app  # noqa: E402
from streamrank.service.batching import BatchPolicy  # noqa: E402
from streamrank.service.settings import load_settings  # noqa: E402
from streamrank.types import Document  # noqa: E402

pytestmark = pytest.mark.slow


def hits(body: dict[str, Any]) -> list[tuple[str, float]]:
    return [(r["id"], r["score"]) for r in body["results"]]


def search(url: str, query: str, pipeline: str, k: int = 10) -> dict[str, Any]:
    reply = httpx.post(f"{url}/search", json={"query": query, "k": k, "pipeline": pipeline}, timeout=60)
    assert reply.status_code == 200, reply.text
    return reply.json()


def test_same_rankings_in_process_on_ray_and_over_four_shards(
    served: SimpleNamespace, corpus: SimpleNamespace, docs: list[Document], minilm: Any, summary_line: Any
) -> None:
    ready = served.ready
    assert ready["status"] == "ready" and ready["pipelines"] == ["dense", "dense-s4", "rerank"], ready
    summary_line(
        f"ray: application ready in {served.startup_s:.0f} s (2 ingress replicas, writer, 2+1+1 pipeline replicas, "
        "1 reranker replica, 4 shard deployments)"
    )
    pipeline = local_pipeline(corpus.dense, corpus.index, minilm)
    settings = load_settings(env={}, pipelines=[str(corpus.dense)], index_dir=str(corpus.index), torch_threads=1)
    queries = [docs[i].title for i in range(0, len(docs), 20)] + ["vitamin D and bone fractures"]
    with TestClient(create_app(settings)) as local:
        for query in queries:
            api = [(c.doc_id, c.score) for c in pipeline.search(query, k=10).candidates]
            reply = local.post("/search", json={"query": query, "k": 10})
            assert reply.status_code == 200 or reply.status_code == 503
            if reply.status_code == 503:  # still warming up
                time.sleep(2)
                reply = local.post("/search", json={"query": query, "k": 10})
            in_process = hits(reply.json())
            on_ray = hits(search(served.url, query, "dense"))
            sharded = hits(search(served.url, query, "dense-s4"))
            assert api == in_process == on_ray == sharded, query
    pipeline.close()
    from ray import serve

    deployments = serve.status().applications["streamrank"].deployments
    assert all(deployments[f"shard-dense-s4-{i}"].replica_states.get("RUNNING", 0) == 1 for i in range(4))


def test_reranker_deployment_apart_from_the_first_stage(
    served: SimpleNamespace, corpus: SimpleNamespace, docs: list[Document], minilm: Any
) -> None:
    """``rerankers = {...}``: dense in ``pipeline-rerank``, E2Rank in ``rerank-rerank``, same rankings."""
    from ray import serve

    deployments = serve.status().applications["streamrank"].deployments
    assert deployments["pipeline-rerank"].replica_states.get("RUNNING", 0) == 1
    assert deployments["rerank-rerank"].replica_states.get("RUNNING", 0) == 1
    pipeline = local_pipeline(corpus.reranked, corpus.index, minilm)
    for query in [docs[5].title, docs[77].title, "vitamin D and bone fractures"]:
        expected = pipeline.search(query, k=10)
        body = search(served.url, query, "rerank")
        assert [h[0] for h in hits(body)] == expected.doc_ids(), query
        assert [h[1] for h in hits(body)] == pytest.approx([c.score for c in expected.candidates], abs=1e-6)
        assert {"dense", "e2rank"} <= set(body["timings_ms"])  # both parts ran, in their own deployments
    pipeline.close()


def test_reranker_split_and_its_errors(corpus: SimpleNamespace, tmp_path: Any) -> None:
    from streamrank.errors import ConfigError
    from streamrank.service.ray_serve import build_application, reranker_split
    from streamrank.service.ray_settings import RaySettings
    from streamrank.service.settings import load_settings

    assert reranker_split(str(corpus.reranked)) == 1 and reranker_split(str(corpus.dense)) is None
    only = tmp_path / "only-rerank.toml"
    only.write_text('name = "only"\n[[stages]]\nkind = "e2rank"\n')
    assert reranker_split(str(only)) is None  # nothing before the reranker to split off
    ray_settings = RaySettings(pipelines={"dense": {"rerankers": {"replicas": 1}}})
    settings = load_settings(env={}, pipelines=[str(corpus.dense)], index_dir=str(corpus.index), ray=ray_settings)
    with pytest.raises(ConfigError, match="ray.pipelines.dense.rerankers: pipeline 'dense' .* has no reranker"):
        build_application(settings)
    everywhere = load_settings(
        env={}, pipelines=[str(corpus.dense)], index_dir=str(corpus.index), ray=RaySettings(rerankers={"replicas": 1})
    )
    build_application(everywhere)  # a top-level `rerankers` splits only the pipelines that have one


def test_replicas_batch_with_the_service_bounds(served: SimpleNamespace) -> None:
    from ray import serve

    handle = serve.get_deployment_handle("pipeline-dense", app_name="streamrank")
    policy = BatchPolicy.of(served.settings)
    assert handle.batch_bounds.remote().result(timeout_s=60) == {
        "max_batch": policy.max_batch, "window_s": policy.window_s, "workers": policy.workers
    }
    sizes: list[int] = []

    def client(n: int) -> None:
        for j in range(3):
            sizes.append(search(served.url, f"protein folding {n} {j}", "dense", k=3)["batch_size"])

    threads = [threading.Thread(target=client, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(sizes) == 24 and max(sizes) > 1 and max(sizes) <= policy.max_batch
    metrics = httpx.get(f"{served.url}/metrics", timeout=30).text
    assert 'streamrank_stage_seconds_count{pipeline="dense",stage="dense"}' in metrics


def replicas(deployment: str) -> list[str]:
    from ray.util import list_named_actors

    return sorted(
        a["name"] for a in list_named_actors(all_namespaces=True)
        if a["name"].startswith("SERVE_REPLICA::") and f"#{deployment}#" in a["name"]
    )


def test_killed_replica_and_shard_lose_no_acknowledged_write(
    served: SimpleNamespace, corpus: SimpleNamespace, docs: list[Document]
) -> None:
    url = served.url
    before = replicas("pipeline-dense")
    assert len(before) == 2, before
    outcomes: list[tuple[float, int]] = []
    stop = threading.Event()

    def client(n: int) -> None:
        while not stop.is_set():
            try:
                reply = httpx.post(f"{url}/search", json={"query": docs[n].title, "k": 5, "pipeline": "dense"}, timeout=60)
                outcomes.append((time.monotonic(), reply.status_code))
            except httpx.HTTPError:
                outcomes.append((time.monotonic(), 0))

    clients = [threading.Thread(target=client, args=(n,)) for n in range(4)]
    for t in clients:
        t.start()
    time.sleep(2.0)
    written = [
        Document(id=f"ray-new-{i}", title=f"Axolotl regeneration study {i}", text=f"Axolotl limb regeneration in orbit, trial {i}.")
        for i in range(4)
    ]
    for doc in written[:2]:  # acknowledged before the kill
        reply = httpx.post(f"{url}/documents", json={"documents": [doc.__dict__], "pipeline": "dense"}, timeout=120)
        assert reply.status_code == 200, reply.text
    victim = ray.get_actor(before[0], namespace="serve")
    killed_at = time.monotonic()
    ray.kill(victim, no_restart=True)
    for doc in written[2:]:  # acknowledged while a replica is down
        reply = httpx.post(f"{url}/documents", json={"documents": [doc.__dict__], "pipeline": "dense"}, timeout=120)
        assert reply.status_code == 200, reply.text
    deadline = time.monotonic() + 150
    while time.monotonic() < deadline and (len(replicas("pipeline-dense")) < 2 or set(replicas("pipeline-dense")) == set(before)):
        time.sleep(1.0)
    time.sleep(3.0)
    stop.set()
    for t in clients:
        t.join()
    after = replicas("pipeline-dense")
    assert len(after) == 2 and before[0] not in after, after
    served_after = [code for at, code in outcomes if at > killed_at + 1.0]
    assert served_after and all(code == 200 for code in served_after), sorted(set(served_after))
    # every acknowledged write is searchable, whichever replica answers (the new one reads the files)
    for doc in written:
        for _ in range(4):
            assert doc.id in [r["id"] for r in search(url, doc.title, "dense", k=3)["results"]]
    sharded_doc = written[0]
    owner = shard_of(sharded_doc.id, 4)
    reply = httpx.post(f"{url}/documents", json={"documents": [sharded_doc.__dict__], "pipeline": "dense-s4"}, timeout=120)
    assert reply.status_code == 200, reply.text
    shard = f"shard-dense-s4-{owner}"
    (replica,) = replicas(shard)
    ray.kill(ray.get_actor(replica, namespace="serve"), no_restart=True)  # Serve replaces it; it opens the files
    codes = []
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        reply = httpx.post(f"{url}/search", json={"query": sharded_doc.title, "k": 3, "pipeline": "dense-s4"}, timeout=120)
        assert reply.status_code in (200, 503), reply.text
        codes.append(reply.status_code)
        if reply.status_code == 200:
            assert reply.json()["results"][0]["id"] == sharded_doc.id
            if replicas(shard) and replica not in replicas(shard):
                break
        else:
            assert "Retry-After" in reply.headers and shard in reply.text, reply.text
        time.sleep(0.5)
    assert codes[-1] == 200 and replica not in replicas(shard), codes
    errors = sum(code != 200 for _, code in outcomes)
    print(f"kill test: {len(outcomes)} requests, {errors} failed, all {len(served_after)} after the kill served")


def test_killed_reranker_replica_gives_503_or_answers_never_500(served: SimpleNamespace, docs: list[Document]) -> None:
    """The reranker deployment's one replica dies: requests meanwhile get an answer or a 503 (its batch
    is sent again, then refused with a reason), and once Serve has replaced it, answers again."""
    before = replicas("rerank-rerank")
    assert len(before) == 1, before
    ray.kill(ray.get_actor(before[0], namespace="serve"), no_restart=True)
    codes: list[int] = []
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        reply = httpx.post(f"{served.url}/search", json={"query": docs[3].title, "k": 5, "pipeline": "rerank"}, timeout=120)
        codes.append(reply.status_code)
        assert reply.status_code in (200, 503), reply.text
        if reply.status_code == 503:
            assert "rerank" in reply.text or "replica" in reply.text, reply.text
        elif set(replicas("rerank-rerank")) - set(before):
            break
        time.sleep(0.5)
    assert codes and codes[-1] == 200, codes
    assert before[0] not in replicas("rerank-rerank")
