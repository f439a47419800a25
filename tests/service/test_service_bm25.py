"""The service over the real configs/bm25.toml (pyserini) on 200 SciFact documents."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from itertools import islice
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
from fastapi.testclient import TestClient
from test_service_support import REPO

from streamrank.compose import load_pipeline
from streamrank.eval.bench.service_load import ServiceProcess
from streamrank.serialize import ranking_to_dict
from streamrank.service.app import create_app
from streamrank.service.settings import load_settings
from streamrank.store import DocumentStore
from streamrank.types import Document

pytestmark = pytest.mark.slow

BM25 = REPO / "configs" / "bm25.toml"
QUERY = "vitamin D deficiency"


@pytest.fixture(scope="module")
def scifact_small(datasets_root: Path, tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """A BEIR folder with the first 200 SciFact documents, indexed with configs/bm25.toml."""
    source = datasets_root / "beir" / "scifact"
    folder = tmp_path_factory.mktemp("scifact-200")
    with (source / "corpus.jsonl").open() as corpus:
        (folder / "corpus.jsonl").write_text("".join(islice(corpus, 200)))
    with (source / "queries.jsonl").open() as queries:
        (folder / "queries.jsonl").write_text("".join(islice(queries, 5)))
    (folder / "qrels").mkdir()
    (folder / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n")
    index = folder / "index"
    pipeline = load_pipeline(BM25, corpus=str(folder), index_dir=index)
    try:
        pipeline.index()
        expected = ranking_to_dict(pipeline.search(QUERY, k=5))
    finally:
        pipeline.close()
    return SimpleNamespace(folder=folder, index=index, expected=expected)


@pytest.fixture(scope="module")
def client(scifact_small: SimpleNamespace) -> Iterator[TestClient]:
    settings = load_settings(
        env={}, pipelines=[str(BM25)], corpus=str(scifact_small.folder), index_dir=str(scifact_small.index)
    )
    with TestClient(create_app(settings)) as c:
        for _ in range(600):
            if c.get("/readyz").json()["status"] != "loading":
                break
            time.sleep(0.05)
        assert c.get("/readyz").status_code == 200, c.get("/readyz").text
        yield c


def test_bm25_search_matches_the_python_api(client: TestClient, scifact_small: SimpleNamespace) -> None:
    body = client.post("/search", json={"query": QUERY, "k": 5}).json()
    assert body["pipeline"] == "bm25" and set(body["timings_ms"]) == {"bm25"}
    assert [(h["id"], h["score"]) for h in body["results"]] == [
        (h["id"], h["score"]) for h in scifact_small.expected["results"]
    ]
    assert all(set(h["stage_scores"]) == {"bm25"} and h["text"] for h in body["results"])


def test_bm25_rerank_response_shape(client: TestClient) -> None:
    docs = ["Vitamin D deficiency is common.", "Unrelated text about birds."]
    body = client.post("/v1/rerank", json={"model": "bm25", "query": QUERY, "documents": docs}).json()
    assert sorted(r["index"] for r in body["results"]) == [0, 1]
    assert all(isinstance(r["relevance_score"], float) for r in body["results"])
    # BM25 alone cannot score text outside its index: the given order, scores 0, and a note (README)
    assert [(r["index"], r["relevance_score"]) for r in body["results"]] == [(0, 0.0), (1, 0.0)]
    assert body["notes"] and "BM25" in body["notes"][0]


def test_bm25_documents_upsert_search_delete(client: TestClient) -> None:
    doc = {"id": "svc-zeolite", "title": "Zeolite", "text": "Zeolite frameworks adsorb carbon dioxide."}
    assert client.post("/documents", json={"documents": [doc]}).status_code == 200
    hits = client.post("/search", json={"query": "zeolite frameworks", "k": 3}).json()["results"]
    assert hits[0]["id"] == "svc-zeolite"
    assert client.delete("/documents/svc-zeolite").status_code == 200
    hits = client.post("/search", json={"query": "zeolite frameworks", "k": 3}).json()["results"]
    assert "svc-zeolite" not in [h["id"] for h in hits]


def test_bm25_crash_then_restart_keeps_acknowledged_and_recovers_unindexed(
    scifact_small: SimpleNamespace, tmp_path: Path
) -> None:
    index = tmp_path / "index"
    shutil.copytree(scifact_small.index, index)
    config = tmp_path / "service.toml"
    config.write_text(
        f'pipelines = ["{BM25}"]\ncorpus = "{scifact_small.folder}"\nindex_dir = "{index}"\n'
        'log_level = "warning"\ntorch_threads = 1\n'
    )
    server = ServiceProcess(config)
    try:
        server.wait_ready(timeout=180)
        doc = {"id": "svc-crash", "title": "Perovskite", "text": "Perovskite solar cells degrade under humidity."}
        assert httpx.post(f"{server.url}/documents", json={"documents": [doc]}, timeout=60).status_code == 200
        server.kill()
    finally:
        server.stop()
    # a write that reached the store but not the index (a crash between the two)
    store = DocumentStore(index / "docs.sqlite")
    store.upsert([Document(id="svc-orphan", title="Graphene", text="Graphene membranes filter seawater.")])
    store.close()

    server = ServiceProcess(config, server.port)
    try:
        ready = server.wait_ready(timeout=180)
        assert ready["recovered"] == {"bm25": {"bm25": 1}}
        for query, doc_id in [("perovskite humidity", "svc-crash"), ("graphene seawater", "svc-orphan")]:
            hits = httpx.post(f"{server.url}/search", json={"query": query, "k": 3}, timeout=60).json()["results"]
            assert hits[0]["id"] == doc_id, json.dumps(hits)[:500]
    finally:
        server.stop()


def test_cli_search_gives_the_same_ranking(scifact_small: SimpleNamespace) -> None:
    """Python API (the fixture), HTTP (above) and the CLI agree on one query: same ids, same scores."""
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "streamrank", "search", QUERY, "-k", "5", "--json", "--pipeline", str(BM25),
         "--corpus", str(scifact_small.folder), "--index-dir", str(scifact_small.index)],
        capture_output=True, text=True, timeout=300, check=True,
    )
    body = json.loads(out.stdout)
    assert [(h["id"], h["score"]) for h in body["results"]] == [
        (h["id"], h["score"]) for h in scifact_small.expected["results"]
    ]
