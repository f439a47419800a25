"""HTTP service through FastAPI's TestClient, over fake stages (see test_service_support.py).

Search, rerank, documents, auth, deadlines, micro-batching, readiness and settings; limits, malformed
requests and request metrics are in test_service_requests.py.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import pytest
from fastapi.testclient import TestClient
from service_client import make_settings, metric, running

from streamrank.compose import load_pipeline
from streamrank.errors import ConfigError
from streamrank.serialize import ranking_to_dict
from streamrank.service.app import create_app
from streamrank.service.settings import load_settings


# ---- search -----------------------------------------------------------------------------------
def test_search_shape_request_id_and_parity_with_python_api(client: TestClient, setup: SimpleNamespace) -> None:
    r = client.post("/search", json={"query": "vitamin bone fractures", "k": 3}, headers={"X-Request-ID": "req-123"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert r.headers["x-request-id"] == body["request_id"] == body["query"]["id"] == "req-123"
    assert {"query", "results", "timings_ms", "model_calls", "degraded", "notes", "pipeline", "batch_size"} <= set(body)
    assert body["pipeline"] == "fake" and body["degraded"] is False
    top = body["results"][0]
    assert top == {
        "rank": 1,
        "id": "d1",
        "score": 3.0,
        "stage_scores": {"fake_retriever": 3.0},
        "title": "Vitamin D",
        "text": "Vitamin D supplements and bone fractures in older adults.",
    }
    assert set(body["timings_ms"]) == {"fake_retriever"} and body["total_ms"] >= body["timings_ms"]["fake_retriever"]

    pipeline = load_pipeline(setup.fake, index_dir=setup.index)  # the same ranking as the Python API
    expected = ranking_to_dict(pipeline.search("vitamin bone fractures", k=3))
    assert [(h["id"], h["score"], h["stage_scores"]) for h in body["results"]] == [
        (h["id"], h["score"], h["stage_scores"]) for h in expected["results"]
    ]
    pipeline.close()

    generated = client.post("/search", json={"query": "sleep"}, headers={"X-Request-ID": "bad id with spaces"})
    assert generated.headers["x-request-id"] != "bad id with spaces"
    assert generated.json()["request_id"] == generated.headers["x-request-id"]


def test_pipelines_health_and_openapi(client: TestClient) -> None:
    listed = client.get("/pipelines").json()["pipelines"]
    assert [(p["name"], p["default"]) for p in listed] == [("fake", True), ("slow", False)]
    assert [s["kind"] for s in listed[1]["stages"]] == ["fake_retriever", "slow_reranker"]
    health = client.get("/healthz")
    assert health.json()["status"] == "ok" and health.headers["x-request-id"] == health.json()["request_id"]
    ready = client.get("/readyz").json()
    assert ready["status"] == "ready" and ready["pipelines"] == ["fake", "slow"]
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/search", "/v1/rerank", "/v2/rerank", "/documents", "/documents/{doc_id}", "/pipelines", "/metrics"} <= set(
        paths
    )
    assert "swagger" in client.get("/docs").text.lower()
    page = client.get("/")
    assert page.status_code == 200 and 'href="/docs"' in page.text


# ---- rerank -----------------------------------------------------------------------------------
RERANK_DOCS = ["Coffee and heart disease.", "Memory in older adults improves with exercise.", "Sleep and memory."]


def test_rerank_cohere_request_and_response(client: TestClient) -> None:
    r = client.post(
        "/v1/rerank",
        json={"model": "fake", "query": "memory older adults", "documents": RERANK_DOCS, "top_n": 2,
              "max_tokens_per_doc": 512},  # Cohere fields the service ignores are accepted
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["id"] == r.headers["x-request-id"] == body["request_id"]
    assert body["meta"]["api_version"]["version"] == "2"
    assert [res["index"] for res in body["results"]] == [1, 2]
    assert all(set(res) == {"index", "relevance_score"} for res in body["results"])
    scores = [res["relevance_score"] for res in body["results"]]
    assert scores == sorted(scores, reverse=True) and scores[0] == 3.0

    v2 = client.post("/v2/rerank", json={"model": "fake", "query": "memory older adults", "documents": RERANK_DOCS})
    assert [res["index"] for res in v2.json()["results"]] == [1, 2, 0]


def test_rerank_jina_objects_return_documents_and_default_model(client: TestClient) -> None:
    docs = [{"text": d} for d in RERANK_DOCS]
    body = client.post("/v1/rerank", json={"query": "coffee", "documents": docs, "return_documents": True}).json()
    assert body["model"] == "fake" and isinstance(body["usage"]["total_tokens"], int)
    assert body["results"][0] == {"index": 0, "relevance_score": 1.0, "document": {"text": RERANK_DOCS[0]}}
    assert all(res["document"]["text"] == RERANK_DOCS[res["index"]] for res in body["results"])


def test_rerank_unknown_model_is_404_naming_pipelines(client: TestClient) -> None:
    r = client.post("/v1/rerank", json={"model": "rerank-v3.5", "query": "q", "documents": ["a"]})
    assert r.status_code == 404
    assert "rerank-v3.5" in r.json()["message"] and "fake" in r.json()["message"]


# ---- documents ----------------------------------------------------------------------------------
def _top_ids(client: TestClient, query: str, pipeline: str = "fake") -> list[str]:
    r = client.post("/search", json={"query": query, "pipeline": pipeline})
    assert r.status_code == 200, r.text
    return [h["id"] for h in r.json()["results"]]


def test_documents_upsert_search_update_delete(client: TestClient) -> None:
    doc = {"id": "new/1", "title": "Xylophone", "text": "xylophone tuning guide"}
    r = client.post("/documents", json={"documents": [doc]})
    assert r.status_code == 200 and r.json()["ids"] == ["new/1"] and r.json()["upserted"] == 1
    assert client.get("/documents/new/1").json()["text"] == "xylophone tuning guide"
    assert _top_ids(client, "xylophone") == ["new/1"]
    assert _top_ids(client, "xylophone", "slow") == ["new/1"]  # same index folder: both pipelines see it

    client.post("/documents", json={"documents": [{**doc, "text": "marimba tuning guide"}]})
    assert _top_ids(client, "marimba") == ["new/1"] and _top_ids(client, "xylophone") == ["new/1"]  # title

    assert client.delete("/documents/new/1").json()["deleted"] == "new/1"
    assert client.get("/documents/new/1").status_code == 404
    assert _top_ids(client, "marimba") == []
    missing = client.delete("/documents/new/1")
    assert missing.status_code == 404 and "new/1" in missing.json()["message"]


# ---- auth ---------------------------------------------------------------------------------------
def test_api_key_from_environment(setup: SimpleNamespace) -> None:
    settings = make_settings(setup, pipelines=("fake",), env={"STREAMRANK_API_KEY": "s3cret"})
    auth = {"Authorization": "Bearer s3cret"}
    with running(settings, headers=auth) as c:
        assert c.get("/healthz").status_code == 200 and c.get("/").status_code == 200
        denied = c.post("/search", json={"query": "sleep"})
        assert denied.status_code == 401 and denied.headers["www-authenticate"] == "Bearer"
        assert "API key" in denied.json()["message"]
        assert c.post("/search", json={"query": "sleep"}, headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert c.get("/metrics").status_code == 401
        assert c.post("/search", json={"query": "sleep"}, headers=auth).status_code == 200
        assert c.post("/search", json={"query": "sleep"}, headers={"X-API-Key": "s3cret"}).status_code == 200


# ---- deadlines ------------------------------------------------------------------------------------
def test_deadline_returns_earlier_stage_degraded(client: TestClient) -> None:
    started = time.monotonic()
    r = client.post("/search", json={"query": "memory older adults", "pipeline": "slow", "deadline_ms": 250})
    elapsed = time.monotonic() - started
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["degraded"] is True and elapsed < 0.9  # the slow reranker takes 1 s
    assert "slow_reranker" in body["notes"][0] and "fake_retriever" in body["notes"][0]
    assert [h["id"] for h in body["results"]] == ["d4", "d1", "d2"]  # the retriever's order
    assert all(set(h["stage_scores"]) == {"fake_retriever"} and h["title"] for h in body["results"])

    rerank = client.post(
        "/v1/rerank", json={"model": "slow", "query": "coffee", "documents": RERANK_DOCS, "deadline_ms": 250}
    ).json()
    assert rerank["degraded"] is True and rerank["results"][0]["index"] == 0


def test_default_deadline_from_settings(setup: SimpleNamespace) -> None:
    with running(make_settings(setup, deadline_ms=200)) as c:
        body = c.post("/search", json={"query": "sleep", "pipeline": "slow"}).json()
        assert body["degraded"] is True
        metrics = c.get("/metrics").text
        assert 'streamrank_degraded_total{pipeline="slow"} 1.0' in metrics


# ---- micro-batching -------------------------------------------------------------------------------
QUERIES = ["vitamin", "sleep memory", "coffee heart", "exercise mood", "bone density", "older adults"] * 2


def _fire_concurrently(c: TestClient) -> list[dict]:
    with ThreadPoolExecutor(len(QUERIES)) as pool:
        responses = list(pool.map(lambda q: c.post("/search", json={"query": q, "pipeline": "batchy"}), QUERIES))
    assert all(r.status_code == 200 for r in responses)
    return [r.json() for r in responses]


def test_micro_batching_fuses_concurrent_requests(setup: SimpleNamespace) -> None:
    with running(make_settings(setup, pipelines=("batchy",), workers=1)) as c:
        bodies = _fire_concurrently(c)
        stage = c.app.state.service.pipelines["batchy"].stages[0]
        assert max(stage.batches) > 1 and max(b["batch_size"] for b in bodies) > 1
        single = {q: _top_ids(c, q, "batchy") for q in set(QUERIES)}
        for q, body in zip(QUERIES, bodies, strict=True):  # fused answers equal one-by-one answers
            assert body["query"]["text"] == q and [h["id"] for h in body["results"]] == single[q]
        metrics = c.get("/metrics").text
        total = metric(metrics, "streamrank_batch_size_sum", pipeline="batchy", kind="search")
        count = metric(metrics, "streamrank_batch_size_count", pipeline="batchy", kind="search")
        assert total / count > 1


def test_batching_off_runs_requests_one_by_one(setup: SimpleNamespace) -> None:
    with running(make_settings(setup, pipelines=("batchy",), batching=False, workers=4)) as c:
        bodies = _fire_concurrently(c)
        assert {b["batch_size"] for b in bodies} == {1}
        assert set(c.app.state.service.pipelines["batchy"].stages[0].batches) == {1}


# ---- readiness and settings ---------------------------------------------------------------------------
def test_readyz_is_503_while_loading_then_200(setup: SimpleNamespace) -> None:
    settings = make_settings(setup, pipelines=("slow",), warmup=True)  # warm-up runs the 1 s reranker
    with TestClient(create_app(settings)) as c:
        loading = c.get("/readyz")
        assert loading.status_code == 503 and loading.json()["status"] == "loading"
        early = c.post("/search", json={"query": "sleep"})
        assert early.status_code == 503 and "loading" in early.json()["message"]
        assert c.get("/healthz").status_code == 200
        for _ in range(100):
            if c.get("/readyz").status_code == 200:
                break
            time.sleep(0.05)
        assert c.get("/readyz").json()["status"] == "ready"


def test_readyz_reports_a_pipeline_that_cannot_load(tmp_path: Path) -> None:
    with TestClient(create_app(load_settings(env={}, pipelines=[str(tmp_path / "missing.toml")]))) as c:
        for _ in range(100):
            body = c.get("/readyz").json()
            if body["status"] != "loading":
                break
            time.sleep(0.02)
        assert body["status"] == "error" and "missing.toml" in body["message"]
        assert c.post("/search", json={"query": "sleep"}).status_code == 503


def test_settings_file_then_environment_then_arguments(tmp_path: Path) -> None:
    config = tmp_path / "service.toml"
    config.write_text('port = 9000\nhost = "0.0.0.0"\npipelines = ["bm25"]\ndeadline_ms = 500\nbatching = true\n')
    env = {"STREAMRANK_SERVICE_CONFIG": str(config), "STREAMRANK_PORT": "9100", "STREAMRANK_BATCHING": "false",
           "STREAMRANK_PIPELINES": "bm25, hybrid", "STREAMRANK_DEADLINE_MS": ""}
    s = load_settings(env=env, port=9200)
    assert (s.host, s.port, s.batching, s.pipelines, s.deadline_ms) == ("0.0.0.0", 9200, False, ["bm25", "hybrid"], None)
    assert load_settings(config, env={}).port == 9000

    config.write_text("prot = 1\n")
    with pytest.raises(ConfigError, match="unknown key 'prot'"):
        load_settings(config, env={})
    with pytest.raises(ConfigError, match="max_k"):
        load_settings(env={"STREAMRANK_MAX_K": "lots"})
