"""The HTTP surface tightened (issue 14, findings 3, 4 and 6), over the fake pipelines in-process:
cross-site writes, bounded metric labels, auth before the body, strict numbers, late answers,
HEAD, no Host reflection, blank API keys, packaged /docs, security headers, slow headers."""

from __future__ import annotations

import base64
import hashlib
import re
import socket
import time
from types import SimpleNamespace

import pytest
from fastapi.testclient import TestClient
from service_client import make_settings, running
from test_service_support import ThreadServer

from streamrank.errors import ConfigError
from streamrank.service.app import create_app
from streamrank.service.settings import load_settings

FORM = {"content-type": "application/x-www-form-urlencoded"}
METHODS = {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"}
UPSERT = b'{"documents": [{"id": "d1", "text": "overwritten by another site"}]}'


# ---- finding 3: cross-site writes ----------------------------------------------------------------
def test_a_form_post_from_another_site_is_refused(client: TestClient) -> None:
    for headers in ({**FORM, "origin": "https://evil.example"}, {**FORM, "sec-fetch-site": "cross-site"},
                    {"content-type": "application/json", "origin": "null"}):
        r = client.post("/documents", content=UPSERT, headers=headers)
        assert r.status_code == 403, r.text
        assert "cross-origin" in r.json()["message"] and "allowed_origins" in r.json()["message"]
    assert client.request("DELETE", "/documents/d1", headers={"origin": "https://evil.example"}).status_code == 403
    # the service's own page: JSON is fine, a form body is not read as JSON
    same = {"origin": "http://testserver"}
    assert client.post("/documents", content=UPSERT, headers={**FORM, **same}).status_code == 415
    assert client.post("/search", json={"query": "sleep"}, headers=same).status_code == 200
    assert client.get("/documents/d1").json()["text"].startswith("Vitamin D supplements")  # never overwritten
    assert client.post("/search", content=b'{"query": "sleep"}', headers=FORM).status_code == 200  # curl -d still works


def test_allowed_origins_and_the_json_only_setting(setup: SimpleNamespace) -> None:
    settings = make_settings(setup, pipelines=("fake",), allowed_origins=["https://app.example"], json_without_content_type=False)
    with running(settings) as c:
        r = c.post("/search", json={"query": "sleep"}, headers={"origin": "https://app.example"})
        assert r.status_code == 200
        assert c.post("/search", content=b'{"query": "sleep"}', headers=FORM).status_code == 415


# ---- finding 4: bounded metric labels ---------------------------------------------------------------
def test_made_up_methods_do_not_grow_the_metrics(client: TestClient) -> None:
    client.request("BREW", "/search")
    before = len(client.get("/metrics").text)
    for i in range(200):
        assert client.request(f"X{i}", "/search").status_code in (400, 405)
    text = client.get("/metrics").text
    methods = set(re.findall(r'streamrank_requests_total\{method="([^"]*)"', text))
    assert methods <= METHODS | {"other"} and "other" in methods
    assert len(text) - before < 2000, len(text) - before


# ---- finding 6 ------------------------------------------------------------------------------------
def test_the_api_key_is_checked_before_the_body_is_read(setup: SimpleNamespace) -> None:
    with running(make_settings(setup, pipelines=("fake",), api_key="k3y"), headers={"X-API-Key": "k3y"}) as c:
        for content in (b'{"query": ', b"\xff\xfe", b'{"k": "ten"}'):
            r = c.post("/search", content=content, headers={"content-type": "application/json"})
            assert r.status_code == 401, r.text
            assert r.headers["www-authenticate"] == "Bearer"
        assert c.post("/search", content=b'{"query": ', headers={"X-API-Key": "k3y"}).status_code == 422
        assert c.get("/docs").status_code == 200 and c.get("/openapi.json").status_code == 200


def test_very_deeply_nested_json_is_422(client: TestClient) -> None:
    r = client.post("/search", content=b'{"query": ' + b"[" * 2000 + b"]" * 2000 + b"}",
                    headers={"content-type": "application/json"})
    assert r.status_code == 422 and "nested too deeply" in r.json()["message"]


@pytest.mark.parametrize(
    ("path", "payload", "field"),
    [("/search", {"query": "sleep", "k": "5"}, "k"), ("/search", {"query": "sleep", "k": True}, "k"),
     ("/search", {"query": "sleep", "k": 2.5}, "k"), ("/search", {"query": "sleep", "deadline_ms": "100"}, "deadline_ms"),
     ("/search", {"query": "sleep", "deadline_ms": True}, "deadline_ms"),
     ("/v1/rerank", {"query": "sleep", "documents": ["a"], "top_n": "1"}, "top_n"),
     ("/v1/rerank", {"query": "sleep", "documents": ["a"], "top_n": False}, "top_n")],
)
def test_numbers_must_be_json_numbers(client: TestClient, path: str, payload: dict, field: str) -> None:
    r = client.post(path, json=payload)
    assert r.status_code == 422 and field in r.json()["message"], r.text


def test_integral_floats_count_as_integers_as_in_json_schema(client: TestClient) -> None:
    assert len(client.post("/search", json={"query": "older adults", "k": 1.0}).json()["results"]) == 1


def test_an_answer_after_its_deadline_is_degraded(client: TestClient) -> None:
    body = client.post("/search", json={"query": "sleep", "deadline_ms": 0.001}).json()
    assert body["degraded"] is True and body["results"] and "deadline passed" in body["notes"][-1]
    assert client.post("/search", json={"query": "sleep", "deadline_ms": 60_000}).json()["degraded"] is False


def test_head_is_served_wherever_get_is(client: TestClient) -> None:
    for path in ("/healthz", "/readyz", "/documents/d1", "/", "/metrics", "/pipelines"):
        get, head = client.get(path), client.head(path)
        assert head.status_code == get.status_code == 200, (path, head.status_code)
        assert head.content == b"" and head.headers["content-type"] == get.headers["content-type"]
    assert client.head("/documents/missing").status_code == 404
    assert "HEAD" in client.put("/documents/d1", json={}).headers["allow"]


def test_trailing_slash_is_not_redirected_to_the_clients_host(client: TestClient) -> None:
    r = client.get("/healthz/", headers={"host": "evil.example"}, follow_redirects=False)
    assert r.status_code == 404 and "location" not in r.headers
    assert "evil.example" not in r.text


@pytest.mark.parametrize("env", [{"STREAMRANK_API_KEY": ""}, {"STREAMRANK_API_KEY": "   "}])
def test_a_blank_api_key_is_a_configuration_error(env: dict[str, str]) -> None:
    with pytest.raises(ConfigError, match="api_key"):
        load_settings(env=env)
    with pytest.raises(ConfigError, match="api_key"):
        load_settings(env={}, api_key="")


def test_docs_load_from_packaged_assets(client: TestClient) -> None:
    pytest.importorskip("swagger_ui_bundle", reason="swagger-ui-bundle is not installed")
    page = client.get("/docs")
    assert page.status_code == 200 and "cdn" not in page.text.lower()
    scripts = re.findall(r'src="([^"]+)"', page.text) + re.findall(r'href="([^"]+\.css)"', page.text)
    assert scripts and all(s.startswith("/docs/assets/") for s in scripts)
    for asset in scripts:
        r = client.get(asset)
        assert r.status_code == 200 and len(r.content) > 1000, asset
    assert "script-src 'self' 'sha256-" in page.headers["content-security-policy"]


def test_security_headers_and_a_csp_matching_the_pages_inline_code(client: TestClient) -> None:
    page = client.get("/")
    policy = page.headers["content-security-policy"]
    assert page.headers["x-content-type-options"] == "nosniff" and page.headers["x-frame-options"] == "DENY"
    assert "frame-ancestors 'none'" in policy and "unsafe-inline" not in policy
    for tag in ("script", "style"):
        for block in re.findall(rf"<{tag}>(.*?)</{tag}>", page.text, flags=re.S):
            digest = base64.b64encode(hashlib.sha256(block.encode()).digest()).decode()
            assert f"'sha256-{digest}'" in policy
    api = client.post("/search", json={"query": "sleep"})
    assert api.headers["x-content-type-options"] == "nosniff" and api.headers["content-security-policy"]


def test_a_client_trickling_its_headers_is_disconnected(setup: SimpleNamespace) -> None:
    settings = make_settings(setup, pipelines=("fake",), header_timeout_s=1.0)
    with ThreadServer(create_app(settings)) as server:
        host, port = server.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
            started, answer = time.monotonic(), b""
            try:
                for _ in range(20):  # one header byte every 0.25 s: never a complete request
                    sock.sendall(b"X")
                    time.sleep(0.25)
            except OSError:  # the server closed the connection
                pass
            sock.settimeout(5)
            try:
                answer = sock.recv(1024)
            except OSError:
                pass
            assert time.monotonic() - started < 4.5
            assert answer == b"" or answer.startswith(b"HTTP/1.1 408")
        with socket.create_connection((host, int(port)), timeout=10) as sock:  # a prompt client is served
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            assert sock.recv(1024).startswith(b"HTTP/1.1 200")
