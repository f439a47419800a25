"""HTTP service through FastAPI's TestClient: request limits, malformed requests, routing, request metrics.

One app per module (the ``client`` fixture); test_metrics_text comes last, after the 422s the other tests caused.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from service_client import LIMITS, metric


# ---- limits and malformed requests --------------------------------------------------------------
@pytest.mark.parametrize(
    ("path", "payload", "setting"),
    [
        ("/search", {"query": "x" * 65}, "max_query_chars"),
        ("/search", {"query": "sleep", "k": 51}, "max_k"),
        ("/v1/rerank", {"query": "sleep", "documents": ["a"] * 5}, "max_rerank_documents"),
        ("/documents", {"documents": [{"id": str(i), "text": "t"} for i in range(3)]}, "max_upsert_documents"),
    ],
)
def test_limits_are_422_naming_the_limit(client: TestClient, path: str, payload: dict, setting: str) -> None:
    r = client.post(path, json=payload)
    assert r.status_code == 422
    assert setting in r.json()["message"] and str(LIMITS[setting]) in r.json()["message"]


def test_body_too_large_is_413_with_or_without_content_length(client: TestClient) -> None:
    big = json.dumps({"query": "x" * 10_000}).encode()
    r = client.post("/search", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and "8192" in r.json()["message"] and r.headers["x-request-id"]

    def chunks() -> Iterator[bytes]:
        for i in range(0, len(big), 1000):
            yield big[i : i + 1000]

    streamed = client.post("/search", content=chunks(), headers={"content-type": "application/json"})
    assert streamed.status_code == 413 and "max_body_bytes" in streamed.json()["message"]


@pytest.mark.parametrize(
    ("content", "content_type", "fragment"),
    [
        (b'{"query": "sleep",', "application/json", "not valid JSON"),
        (b"\xff\xfe\x00", "application/json", "not valid JSON"),
        (b'"sleep"', None, "JSON object"),
        (b"query=sleep", "application/x-www-form-urlencoded", "not valid JSON"),
        (b"[1, 2]", "application/json", "JSON object"),
        (b'{"k": 3}', "application/json", "query: Field required"),
        (b'{"query": "sleep", "k": "ten"}', "application/json", "k:"),
        (b'{"query": "sleep", "k": 0}', "application/json", "k:"),
        (b'{"query": "sleep", "colour": "red"}', "application/json", "colour"),
        (b'{"query": "   "}', "application/json", "empty"),
    ],
)
def test_malformed_requests_are_422_never_500(
    client: TestClient, content: bytes, content_type: str | None, fragment: str
) -> None:
    headers = {"content-type": content_type} if content_type else {}
    r = client.post("/search", content=content, headers=headers)
    assert r.status_code == 422, r.text
    assert fragment in r.json()["message"] and r.json()["request_id"] == r.headers["x-request-id"]


@pytest.mark.parametrize(
    ("path", "content", "fragment"),
    [
        ("/documents", b'{"documents": [{"id": "s1", "text": "bone \\ud800"}]}', "documents.0.text"),
        ("/v1/rerank", b'{"query": "bone", "documents": ["\\udfff"], "return_documents": true}', "documents.0"),
        ("/v2/rerank", b'{"query": "bone", "documents": [{"text": "a", "title": "\\ud800"}]}', "documents.0"),
        ("/search", b'{"query": "bone", "user_history": ["\\ud800"]}', "user_history.0"),
    ],
)
def test_lone_surrogates_are_422_not_500(client: TestClient, path: str, content: bytes, fragment: str) -> None:
    """JSON may spell a lone UTF-16 surrogate; the store and the response encoder cannot (was a 500)."""
    r = client.post(path, content=content, headers={"content-type": "application/json"})
    assert r.status_code == 422, r.text
    assert fragment in r.json()["message"] and "surrogate" in r.json()["message"]


def test_rerank_documents_must_be_strings_or_objects_and_flags_booleans(client: TestClient) -> None:
    r = client.post("/v1/rerank", json={"query": "bone", "documents": [5]})
    assert r.status_code == 422 and "must be a string or an object" in r.json()["message"]
    r = client.post("/v1/rerank", json={"query": "bone", "documents": ["a"], "return_documents": 0})
    assert r.status_code == 422 and "return_documents" in r.json()["message"]


def test_openapi_shows_the_limits_and_errors(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    requests = schema["components"]["schemas"]
    assert requests["SearchRequest"]["properties"]["k"]["maximum"] == LIMITS["max_k"]
    assert requests["SearchRequest"]["properties"]["query"]["maxLength"] == LIMITS["max_query_chars"]
    assert requests["RerankRequest"]["properties"]["documents"]["maxItems"] == LIMITS["max_rerank_documents"]
    assert requests["UpsertRequest"]["properties"]["documents"]["maxItems"] == LIMITS["max_upsert_documents"]
    assert {"200", "401", "404", "413", "422", "503"} <= set(schema["paths"]["/search"]["post"]["responses"])


def test_method_not_allowed_lists_every_method_of_the_path(client: TestClient) -> None:
    r = client.put("/documents/d1", json={})
    assert r.status_code == 405
    assert {m.strip() for m in r.headers["allow"].split(",")} >= {"GET", "DELETE"}


def test_json_body_sent_the_curl_way_is_accepted(client: TestClient) -> None:
    """`curl -d '{...}'` sends a form content type; the body is still JSON and is read as such."""
    expected = client.post("/search", json={"query": "sleep", "k": 2}).json()["results"]
    assert expected
    for headers in ({"content-type": "application/x-www-form-urlencoded"}, {}):
        r = client.post("/search", content=b'{"query": "sleep", "k": 2}', headers=headers)
        assert r.status_code == 200, r.text
        assert r.json()["results"] == expected


def test_unknown_route_and_pipeline(client: TestClient) -> None:
    assert client.get("/nope").status_code == 404
    r = client.post("/search", json={"query": "sleep", "pipeline": "nope"})
    assert r.status_code == 404 and "nope" in r.json()["message"]


def test_metrics_text(client: TestClient) -> None:
    client.post("/search", json={"query": "sleep"})
    text = client.get("/metrics")
    assert text.headers["content-type"].startswith("text/plain")
    assert metric(text.text, "streamrank_requests_total", route="/search", status="200") >= 1
    assert metric(text.text, "streamrank_errors_total", route="/search", status="422") >= 1
    assert metric(text.text, "streamrank_stage_seconds_count", pipeline="fake", stage="fake_retriever") >= 1
    assert metric(text.text, "streamrank_request_seconds_count", route="/search") >= 1
    assert metric(text.text, "streamrank_ready") == 1
