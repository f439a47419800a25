"""Fault injection with the real components: `streamrank serve` (uvicorn) over configs/bm25.toml
(pyserini/Lucene) and the SQLite store, on a 40-document corpus (issue 14).

- a poison document (an id over Lucene's 32,766-byte term limit): refused before it is written;
  one already in the store is quarantined at startup, reported, and deletable through the API;
- SIGKILL at random points during concurrent upserts, then SIGTERM with upserts in flight:
  no acknowledged document lost, in-flight requests answered, exit status 0, drain time;
- a read-only index folder and a full disk (a small tmpfs): 503/507 with the reason, readiness
  says so, searches go on, writes work again once the disk does. Mounting needs root and
  CAP_SYS_ADMIN; without them these two are skipped with the reason.

Each test prints its figures in the `streamrank` section at the end of the run (BENCHMARKS.md).
"""

from __future__ import annotations

import asyncio
import json
import random
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
from test_service_support import REPO, write_topic_corpus

from streamrank.compose import load_pipeline
from streamrank.eval.bench.service_load import ServiceProcess
from streamrank.store import DocumentStore
from streamrank.types import Document

pytestmark = pytest.mark.slow

BM25 = REPO / "configs" / "bm25.toml"
SEED = 14
POISON = "M" * 40_000
@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """A 40-document BEIR folder and its BM25 index (built once, copied by each test)."""
    folder = write_topic_corpus(tmp_path_factory.mktemp("faults-corpus"), 40)
    pipeline = load_pipeline(BM25, corpus=str(folder), index_dir=folder / "index")
    try:
        pipeline.index()
    finally:
        pipeline.close()
    return SimpleNamespace(folder=folder, index=folder / "index")


def copy_index(corpus: SimpleNamespace, target: Path) -> Path:
    shutil.copytree(corpus.index, target)
    return target


def server(corpus: SimpleNamespace, index: Path, tmp_path: Path, port: int | None = None, **settings) -> ServiceProcess:
    """`streamrank serve` over ``index`` (settings from a TOML file next to it)."""
    config = tmp_path / "service.toml"
    lines = [f'pipelines = ["{BM25}"]', f'corpus = "{corpus.folder}"', f'index_dir = "{index}"',
             'log_level = "info"', "torch_threads = 1", *(f"{k} = {json.dumps(v)}" for k, v in settings.items())]
    config.write_text("\n".join(lines) + "\n")
    return ServiceProcess(config, port)


def top_hit(url: str, query: str) -> str | None:
    results = httpx.post(f"{url}/search", json={"query": query, "k": 1}, timeout=60).json()["results"]
    return results[0]["id"] if results else None


def stored_ids(index: Path) -> set[str]:
    store = DocumentStore(index / "docs.sqlite")
    try:
        return set(store.ids())
    finally:
        store.close()


# ---- finding 1: one bad document -----------------------------------------------------------------
def test_a_poison_document_in_the_store_is_quarantined_and_a_new_one_refused(
    corpus: SimpleNamespace, tmp_path: Path, summary_line: Callable[[str], None]
) -> None:
    index = copy_index(corpus, tmp_path / "index")
    store = DocumentStore(index / "docs.sqlite")  # what the old service committed before Lucene threw
    store.upsert([Document(id=POISON, text="x"), Document(id="orphan", text="tungsten filament")])
    store.close()
    first = server(corpus, index, tmp_path)
    try:
        ready = first.wait_ready()  # it starts: the poison is quarantined, not fatal
        assert ready["status"] == "degraded" and list(ready["quarantined"]["bm25"]) == [POISON]
        assert "immense term" in ready["quarantined"]["bm25"][POISON]
        assert "\tat " not in json.dumps(ready) and "Traceback" not in json.dumps(ready)  # no stack trace
        assert ready["recovered"] == {"bm25": {"bm25": 1}} and top_hit(first.url, "tungsten") == "orphan"
        metrics = httpx.get(f"{first.url}/metrics").text
        assert 'streamrank_quarantined_documents{pipeline="bm25"} 1.0' in metrics
        again = httpx.post(f"{first.url}/documents", json={"documents": [{"id": POISON, "text": "y"}]}, timeout=60)
        assert again.status_code == 422 and "max_id_bytes" in again.json()["message"], again.text
        deleted = httpx.request("DELETE", f"{first.url}/documents", json={"ids": [POISON]}, timeout=60)
        assert deleted.status_code == 200 and deleted.json()["deleted"] == [POISON]
        assert httpx.get(f"{first.url}/readyz").json()["status"] == "ready"
        log = first.log_tail(50_000)
        assert "quarantined" in log and repr(POISON[:60]) in log
    finally:
        first.stop()
    assert first.proc.returncode == 0 and POISON not in stored_ids(index)

    second = server(corpus, index, tmp_path, first.port)
    try:
        ready = second.wait_ready()
        assert ready["status"] == "ready" and ready["quarantined"] == {} and ready["recovered"] == {}
    finally:
        second.stop()
    summary_line("fault injection, poison document (40,000-byte id): 1 in the store quarantined at startup "
                 "(service ready, reported in /readyz, /metrics, the log), a new one 422 before any write, "
                 "the stored one deleted through the API; restart clean")


def test_a_write_lucene_refuses_is_undone_in_the_store(corpus: SimpleNamespace, tmp_path: Path) -> None:
    """With the id limit raised past Lucene's, the index refuses: the whole write is undone."""
    from fastapi.testclient import TestClient

    from streamrank.service.app import create_app
    from streamrank.service.settings import load_settings

    index = copy_index(corpus, tmp_path / "index")
    settings = load_settings(env={}, pipelines=[str(BM25)], corpus=str(corpus.folder), index_dir=str(index),
                             max_id_bytes=100_000, warmup=False)
    with TestClient(create_app(settings)) as c:
        for _ in range(600):
            if c.get("/readyz").json()["status"] != "loading":
                break
            time.sleep(0.05)
        batch = [{"id": "c0", "text": "replacement about zeppelins"}, {"id": "fresh", "text": "xenon lamps"},
                 {"id": POISON, "text": "x"}]
        r = c.post("/documents", json={"documents": batch})
        assert r.status_code == 422 and "'bm25' index refused" in r.json()["message"], r.text
        assert "\n" not in r.json()["message"] and len(r.json()["message"]) < 600
        for query in ("zeppelins", "xenon"):
            assert c.post("/search", json={"query": query}).json()["results"] == []
        assert c.post("/search", json={"query": "glacier w0", "k": 1}).json()["results"][0]["id"] == "c0"
        assert c.get("/documents/fresh").status_code == 404 and c.get("/readyz").json()["status"] == "ready"
    assert {"fresh", POISON}.isdisjoint(stored_ids(index))


# ---- finding 2: kills and a graceful stop during upserts ---------------------------------------------
async def _upsert_until_down(url: str, prefix: str, clients: int, acked: dict[str, str], stop: asyncio.Event) -> None:
    async def client(n: int) -> None:
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:
            i = 0
            while not stop.is_set():
                doc = {"id": f"{prefix}-{n}-{i}", "text": f"w{prefix}x{n}x{i} acknowledged write"}
                try:
                    r = await http.post("/documents", json={"documents": [doc]})
                except httpx.TransportError:
                    return  # the server is gone
                if r.status_code == 200:
                    acked[doc["id"]] = doc["text"]
                i += 1

    await asyncio.gather(*(client(n) for n in range(clients)))


async def _crash_during_upserts(target: ServiceProcess, prefix: str, delay: float, acked: dict[str, str]) -> None:
    """4 clients upserting into ``target`` until it is SIGKILLed ``delay`` s in (a random point of some write)."""

    async def kill_later() -> None:
        await asyncio.sleep(delay)
        target.proc.kill()

    killer = asyncio.create_task(kill_later())
    await _upsert_until_down(target.url, prefix, 4, acked, asyncio.Event())
    await killer


def test_kills_and_a_graceful_stop_during_upserts_lose_no_acknowledged_document(
    corpus: SimpleNamespace, tmp_path: Path, summary_line: Callable[[str], None]
) -> None:
    rng = random.Random(SEED)
    index = copy_index(corpus, tmp_path / "index")
    acked: dict[str, str] = {}
    kills = 3
    slack = {"shutdown_timeout_s": 120}  # the drain must not be cut on a loaded machine
    current = server(corpus, index, tmp_path, **slack)
    port = current.port
    try:
        for round_ in range(kills):
            current.wait_ready()
            asyncio.run(_crash_during_upserts(current, f"k{round_}", rng.uniform(0.5, 2.5), acked))
            current.proc.wait(timeout=30)
            current = server(corpus, index, tmp_path, port, **slack)  # its startup recovery repairs the crash

        # SIGTERM with writes in flight: every one answered, exit status 0
        current.wait_ready()
        in_flight = [{"id": f"term-{i}", "text": f"wterm{i} drained write"} for i in range(8)]

        async def terminate() -> tuple[list[httpx.Response], float]:
            async with httpx.AsyncClient(base_url=current.url, timeout=60) as http:
                sent = [asyncio.create_task(http.post("/documents", json={"documents": [d]})) for d in in_flight]
                await asyncio.sleep(0.2)
                current.proc.terminate()
                signalled = time.monotonic()
                return list(await asyncio.gather(*sent)), signalled

        responses, signalled = asyncio.run(terminate())
        code = current.proc.wait(timeout=60)
        drain = time.monotonic() - signalled
    finally:
        current.stop()
    assert [r.status_code for r in responses] == [200] * len(in_flight), current.log_tail()
    assert code == 0 and "stopped on SIGTERM" in current.log_tail(), current.log_tail()
    acked.update({d["id"]: d["text"] for d in in_flight})

    # every acknowledged document, after the restart a server would do (recover, then search)
    pipeline = load_pipeline(BM25, corpus=str(corpus.folder), index_dir=index)
    try:
        repaired = pipeline.recover()
        found = pipeline.context.store.get_many(list(acked))
        top = {doc_id: pipeline.search(text.split()[0], k=1).candidates for doc_id, text in acked.items()}
    finally:
        pipeline.close()
    lost = [i for i, text in acked.items() if i not in found or found[i].text != text or [c.doc_id for c in top[i]] != [i]]
    assert repaired == {} and len(acked) > len(in_flight) and not lost, (repaired, lost[:10])
    summary_line(
        f"fault injection, kills: {kills} SIGKILLs at random points of concurrent upserts (4 clients) + 1 SIGTERM "
        f"survived; {len(acked)} acknowledged documents checked (store and BM25 top hit), {len(lost)} lost; "
        f"SIGTERM with {len(in_flight)} upserts in flight: all answered, exit 0, drained in {drain:.2f} s"
    )


# ---- finding 5: a read-only index folder, a full disk ------------------------------------------------
def _mount(*args: str) -> str | None:
    """Run mount; the reason it failed, or None."""
    if shutil.which("mount") is None:
        return "no mount command"
    done = subprocess.run(["mount", *args], capture_output=True, text=True)
    return None if done.returncode == 0 else (done.stderr.strip() or f"mount exited {done.returncode}")


@contextmanager
def mounted(*args: str, target: Path) -> Iterator[None]:
    reason = _mount(*args, str(target))
    if reason is not None:
        pytest.skip(f"cannot mount here (needs root and CAP_SYS_ADMIN): {reason}")
    try:
        yield
    finally:
        subprocess.run(["umount", "-l", str(target)], capture_output=True)


def _write(url: str, doc_id: str, text: str) -> httpx.Response:
    return httpx.post(f"{url}/documents", json={"documents": [{"id": doc_id, "text": text}]}, timeout=60)


def _wait_status(url: str, wanted: str) -> dict:
    for _ in range(50):
        body = httpx.get(f"{url}/readyz", timeout=30).json()
        if body["status"] == wanted:
            return body
        time.sleep(0.1)
    return body


def test_a_read_only_index_folder_then_a_full_disk(
    corpus: SimpleNamespace, tmp_path: Path, summary_line: Callable[[str], None]
) -> None:
    """One server whose index folder is an 8 MiB tmpfs: its Lucene folder remounted read-only, then
    the disk filled up; each time 503/507 with the reason, nothing kept, readiness degraded,
    searches served, and writes working again once the disk is back."""
    disk = tmp_path / "disk"
    disk.mkdir()
    with mounted("-t", "tmpfs", "-o", "size=8m", "tmpfs", target=disk):
        index = copy_index(corpus, disk / "index")
        running = server(corpus, index, tmp_path)
        try:
            running.wait_ready()
            assert _write(running.url, "before", "written before the faults").status_code == 200

            lucene = index / "bm25"
            with mounted("--bind", str(lucene), target=lucene):
                if _mount("-o", "remount,ro,bind", str(lucene)) is not None:
                    pytest.skip("cannot remount read-only here")
                ready = _wait_status(running.url, "degraded")
                assert ready["writable"] is False and any("read-only" in p for p in ready["problems"]), ready
                r = _write(running.url, "blocked", "vanadium oxide")
                assert r.status_code == 503 and "read-only" in r.json()["message"], r.text
                assert "'bm25' index" in r.json()["message"] and r.headers["retry-after"]
                assert top_hit(running.url, "glacier w0") == "c0"  # searches go on
            assert _write(running.url, "after", "chromium plating").status_code == 200
            assert _wait_status(running.url, "ready")["writable"] is True
            assert top_hit(running.url, "vanadium") is None and top_hit(running.url, "chromium") == "after"

            filler = disk / "filler"
            with filler.open("wb") as handle, pytest.raises(OSError):
                while True:
                    handle.write(b"\0" * 65536)
                    handle.flush()
            r = _write(running.url, "cramped", "molybdenum " * 2000)
            assert r.status_code == 507 and "disk is full" in r.json()["message"], r.text
            ready = _wait_status(running.url, "degraded")
            assert ready["writable"] is False and any("full" in p for p in ready["problems"]), ready
            assert top_hit(running.url, "glacier w0") == "c0"
            filler.unlink()
            assert _write(running.url, "spacious", "tantalum capacitors").status_code == 200
            assert top_hit(running.url, "tantalum") == "spacious" and top_hit(running.url, "molybdenum") is None
            assert _wait_status(running.url, "ready")["writable"] is True
        finally:
            running.stop()
        assert {"blocked", "cramped"}.isdisjoint(stored_ids(index)) and {"after", "spacious"} <= stored_ids(index)
    summary_line(
        "fault injection, disk: read-only Lucene folder -> upsert 503 with the reason; full 8 MiB tmpfs -> upsert 507 "
        "with the reason; both undone in the store, /readyz degraded (writable false), searches served, "
        "writes resume once the disk is back"
    )
