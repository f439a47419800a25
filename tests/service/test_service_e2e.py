"""The service as users run it: real uvicorn on 127.0.0.1, a crash (SIGKILL) and restart, a graceful stop
(SIGTERM, SIGINT) with writes in flight, the page in Chromium."""

from __future__ import annotations

import asyncio
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
from test_service_support import (
    CORPUS,
    REPO,
    ThreadServer,
    build_index,
    fake_server,
    register,
    words,
    write_pipeline,
)

from streamrank.service.app import create_app
from streamrank.service.settings import load_settings

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
ARTIFACTS = REPO / "tests" / "artifacts"
PAGE_QUERY = "vitamin bone fractures"
PAGE_MATCHES = [d.id for d in CORPUS if words(PAGE_QUERY) & words(d.contents)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimpleNamespace]:
    with pytest.MonkeyPatch.context() as mp:
        register(mp)
        root = tmp_path_factory.mktemp("service-e2e")
        ns = SimpleNamespace(root=root, index=root / "index", fake=write_pipeline(root, "fake", delay=0.05))
        build_index(ns.fake, ns.index)
        yield ns


@pytest.fixture(scope="module")
def server(setup: SimpleNamespace) -> Iterator[ThreadServer]:
    settings = load_settings(env={}, pipelines=[str(setup.fake)], index_dir=str(setup.index), workers=1)
    with ThreadServer(create_app(settings)) as running:
        yield running


def test_real_server_fuses_concurrent_clients(server: ThreadServer) -> None:
    queries = ["vitamin bone", "sleep memory", "coffee heart", "exercise mood"] * 8

    async def fire() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            return await asyncio.gather(*(client.post("/search", json={"query": q, "k": 2}) for q in queries))

    responses = asyncio.run(fire())
    assert [r.status_code for r in responses] == [200] * len(queries)
    assert all(r.json()["query"]["text"] == q for r, q in zip(responses, queries, strict=True))
    assert all(r.headers["x-request-id"] == r.json()["request_id"] for r in responses)
    assert max(r.json()["batch_size"] for r in responses) > 1
    metrics = httpx.get(f"{server.url}/metrics").text
    assert 'streamrank_batch_size_count{kind="search",pipeline="fake"}' in metrics


def test_acknowledged_documents_survive_a_crash(setup: SimpleNamespace, tmp_path: Path) -> None:
    index = tmp_path / "index"
    shutil.copytree(setup.index, index)
    config = tmp_path / "service.toml"
    config.write_text(f'pipelines = ["{setup.fake}"]\nindex_dir = "{index}"\nwarmup = false\nlog_level = "warning"\n')
    first = fake_server(config)
    try:
        first.wait_ready()
        doc = {"id": "crash-1", "title": "Xylophone", "text": "xylophone tuning after a power cut"}
        assert httpx.post(f"{first.url}/documents", json={"documents": [doc]}).status_code == 200
        first.kill()  # SIGKILL right after the acknowledgement: the fake index never wrote it to disk
    finally:
        first.stop()
    assert "crash-1" not in (index / "fake" / "index.json").read_text()

    second = fake_server(config, first.port)
    try:
        ready = second.wait_ready()
        assert ready["recovered"] == {"fake": {"fake_retriever": 1}}
        hits = httpx.post(f"{second.url}/search", json={"query": "xylophone"}).json()["results"]
        assert [h["id"] for h in hits] == ["crash-1"] and hits[0]["title"] == "Xylophone"
        assert httpx.get(f"{second.url}/documents/crash-1").json()["text"] == doc["text"]
        assert len(httpx.post(f"{second.url}/search", json={"query": "older adults"}).json()["results"]) == 2
    finally:
        second.stop()


def test_search_page_in_headless_chromium(server: ThreadServer) -> None:
    if not CHROMIUM.exists():
        pytest.skip("Chromium is not installed at /usr/bin/chromium (apt-get install -y chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 800})
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(server.url + "/")
            page.wait_for_selector("#pipeline option[value='fake']", state="attached")
            page.fill("#q", PAGE_QUERY)
            page.click("#go")
            page.wait_for_selector("li.hit")
            hits = page.locator("li.hit")
            assert hits.count() == len(PAGE_MATCHES)
            assert hits.first.get_attribute("data-doc-id") == "d1"
            assert "Vitamin D" in hits.first.inner_text()
            assert "fake_retriever: 3.0000" in hits.first.locator(".stage-score").inner_text()
            assert "fake_retriever" in page.inner_text("#timings") and "total" in page.inner_text("#timings")
            assert page.get_attribute("a[href='/docs']", "href") == "/docs"
            assert "results from fake" in page.inner_text("#status")
            page.screenshot(path=str(ARTIFACTS / "search-page.png"), full_page=True)
            assert not errors
        finally:
            browser.close()
    assert (ARTIFACTS / "search-page.png").stat().st_size > 1000



@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_drains_in_flight_writes_closes_the_indexes_and_exits_0(
    setup: SimpleNamespace, tmp_path: Path, stop: signal.Signals
) -> None:
    index = tmp_path / "index"
    shutil.copytree(setup.index, index)
    slow_writes = write_pipeline(tmp_path, "fake", add_delay=0.25)  # writes queue on the write lock
    config = tmp_path / "service.toml"
    config.write_text(f'pipelines = ["{slow_writes}"]\nindex_dir = "{index}"\nwarmup = false\nlog_level = "info"\n')
    docs = [{"id": f"drain-{i}", "text": f"harpsichord{i} rehearsal"} for i in range(6)]

    async def upsert_then_stop(server) -> tuple[list[httpx.Response], float]:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            sent = [asyncio.create_task(client.post("/documents", json={"documents": [d]})) for d in docs]
            await asyncio.sleep(0.4)  # all sent; the first one or two written, the rest waiting
            server.proc.send_signal(stop)
            stopped = time.monotonic()
            return list(await asyncio.gather(*sent)), stopped

    server = fake_server(config)
    try:
        server.wait_ready()
        responses, stopped = asyncio.run(upsert_then_stop(server))
        code = server.proc.wait(timeout=30)
        drain = time.monotonic() - stopped
    finally:
        server.stop()
    assert [r.status_code for r in responses] == [200] * len(docs), server.log_tail()
    assert code == 0, server.log_tail()
    assert drain < 10, drain
    log = server.log_tail(20_000)
    assert "Shutting down" in log and f"stopped on {stop.name}" in log and "Traceback" not in log
    assert all(d["id"] in (index / "fake" / "index.json").read_text() for d in docs)  # flushed at close

    again = fake_server(config, server.port)
    try:
        assert again.wait_ready()["recovered"] == {}  # nothing to repair: it was a clean stop
        for d in docs:
            assert httpx.get(f"{again.url}/documents/{d['id']}").json()["text"] == d["text"]
    finally:
        again.stop()
