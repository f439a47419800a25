"""Document writes over fake pipelines (issue 14, findings 1 and 5): every limit is checked before
anything is written, a write an index refuses is undone everywhere, recovery quarantines a stored
document an index refuses instead of failing, and disk errors are a 507/503 with the reason.

The real-Lucene versions (a 40,000-byte id, a read-only index folder, a full disk) are in
test_service_faults.py.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import pytest
from fastapi.testclient import TestClient
from service_client import metric, running
from test_service_support import DISK_FULL, REFUSED, build_index, register, write_pipeline

from streamrank.service.settings import load_settings
from streamrank.store import DocumentStore
from streamrank.types import Document


@pytest.fixture
def ns(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> SimpleNamespace:
    """A fresh index per test (these tests change it), with two pipelines over it."""
    register(monkeypatch)
    ns = SimpleNamespace(index=tmp_path / "index", fake=write_pipeline(tmp_path, "fake"), other=write_pipeline(tmp_path, "other"))
    build_index(ns.fake, ns.index)
    return ns


@contextmanager
def serve(ns: SimpleNamespace, **overrides) -> Iterator[TestClient]:
    settings = load_settings(
        env={}, pipelines=[str(ns.fake), str(ns.other)], index_dir=str(ns.index), warmup=False, **overrides
    )
    with running(settings) as client:
        yield client


def stored(ns: SimpleNamespace, doc_id: str) -> Document | None:
    store = DocumentStore(ns.index / "docs.sqlite")
    try:
        return store.get(doc_id)
    finally:
        store.close()


def hits(client: TestClient, query: str, pipeline: str = "fake") -> list[str]:
    return [h["id"] for h in client.post("/search", json={"query": query, "pipeline": pipeline}).json()["results"]]


# ---- validation before durability ------------------------------------------------------------------
def test_every_limit_is_checked_before_anything_is_written(ns: SimpleNamespace) -> None:
    with serve(ns, max_document_chars=100) as c:
        first = {"id": "fine-1", "text": "harmless words"}
        r = c.post("/documents", json={"documents": [first, {"id": "M" * 600, "text": "x"}]})
        assert r.status_code == 422 and "max_id_bytes" in r.json()["message"] and "600" in r.json()["message"]
        r = c.post("/documents", json={"documents": [first, {"id": "ok", "text": "y" * 90, "title": "z" * 20}]})
        assert r.status_code == 422 and "max_document_chars" in r.json()["message"]
        assert c.get("/documents/fine-1").status_code == 404  # the valid first document was not written either
        r = c.post("/documents", json={"documents": [{"id": "é" * 257, "text": "two bytes each"}]})
        assert r.status_code == 422 and "514; the limit is 512" in r.json()["message"]  # UTF-8 bytes
    assert stored(ns, "fine-1") is None


@pytest.mark.parametrize(
    ("doc_id", "fragment"),
    [("   ", "only whitespace"), (" lead", "whitespace"), ("trail\t", "whitespace"), ("a\x00b", "control character"),
     ("a\nb", "control character"), ("a\u2028b", "line separator"), ("", "empty")],
)
def test_bad_ids_are_refused(ns: SimpleNamespace, doc_id: str, fragment: str) -> None:
    with serve(ns) as c:
        r = c.post("/documents", json={"documents": [{"id": doc_id, "text": "text"}]})
        assert r.status_code == 422, r.text
        assert "documents.0.id" in r.json()["message"] and fragment in r.json()["message"]


def test_ids_are_stored_nfc_normalised_and_found_in_either_form(ns: SimpleNamespace) -> None:
    decomposed, composed = "cafe\u0301", "caf\u00e9"
    with serve(ns) as c:
        r = c.post("/documents", json={"documents": [{"id": decomposed, "text": "espresso crema"}]})
        assert r.status_code == 200 and r.json()["ids"] == [composed]
        assert c.get(f"/documents/{decomposed}").json()["id"] == composed == c.get(f"/documents/{composed}").json()["id"]
        assert hits(c, "espresso") == [composed]
        assert c.delete(f"/documents/{decomposed}").json()["deleted"] == composed
        assert c.get(f"/documents/{composed}").status_code == 404


# ---- a write an index refuses ----------------------------------------------------------------------
def test_a_refused_document_undoes_the_whole_write_in_every_pipeline(ns: SimpleNamespace) -> None:
    with serve(ns) as c:
        batch = [
            {"id": "d1", "title": "Vitamin D", "text": "replaced by zeppelin text"},  # a replacement
            {"id": "new-1", "text": "xylophone tuning"},  # a new document, before the refused one
            {"id": "bad-1", "text": f"this one says {REFUSED}"},
        ]
        r = c.post("/documents", json={"documents": batch})
        assert r.status_code == 422, r.text
        body = r.json()
        assert body["type"] == "DocumentsRefused" and "fake_retriever" in body["message"]
        assert "nothing was written" in body["message"] and "Traceback" not in body["message"]
        for pipeline in ("fake", "other"):  # both pipelines over the folder: as before the write
            assert hits(c, "xylophone", pipeline) == [] and hits(c, "zeppelin", pipeline) == []
            assert hits(c, "vitamin fractures", pipeline)[0] == "d1"
        assert c.get("/documents/new-1").status_code == 404 and c.get("/documents/bad-1").status_code == 404
        assert c.get("/documents/d1").json()["text"].startswith("Vitamin D supplements")
        assert c.get("/readyz").json()["status"] == "ready"
        assert metric(c.get("/metrics").text, "streamrank_write_errors_total", reason="refused") == 1
        assert c.post("/documents", json={"documents": batch[:2]}).status_code == 200  # the service still writes
        assert hits(c, "xylophone", "other") == ["new-1"]
    assert stored(ns, "bad-1") is None and stored(ns, "new-1") is not None


def test_recovery_quarantines_a_stored_document_the_index_refuses(ns: SimpleNamespace) -> None:
    store = DocumentStore(ns.index / "docs.sqlite")  # as an older version (or a crash) left the store
    store.upsert([Document(id="poison", text=f"stored before validation {REFUSED}"),
                  Document(id="orphan", text="graphene membranes")])
    store.close()
    with serve(ns) as c:
        ready = c.get("/readyz")
        assert ready.status_code == 200, ready.text
        body = ready.json()
        assert body["status"] == "degraded" and "quarantined" in body["message"]
        assert set(body["quarantined"]) == {"fake", "other"}
        assert "poison" in body["quarantined"]["fake"] and "refused" in body["quarantined"]["fake"]["poison"]
        assert body["recovered"]["fake"] == {"fake_retriever": 1}  # the good orphan was re-added
        assert hits(c, "graphene") == ["orphan"]
        assert metric(c.get("/metrics").text, "streamrank_quarantined_documents", pipeline="fake") == 1
        assert c.get("/documents/poison").status_code == 200  # kept in the store
        assert c.delete("/documents/poison").status_code == 200  # and the API can remove it
        after = c.get("/readyz").json()
        assert after["status"] == "ready" and after["quarantined"] == {}
        assert metric(c.get("/metrics").text, "streamrank_quarantined_documents", pipeline="fake") == 0


def test_delete_many_by_body_takes_any_stored_id(ns: SimpleNamespace) -> None:
    long_id = "L" * 20_000  # longer than a request line may be: only a body can carry it
    store = DocumentStore(ns.index / "docs.sqlite")
    store.upsert([Document(id=long_id, text="long id")])
    store.close()
    with serve(ns) as c:
        r = c.request("DELETE", "/documents", json={"ids": [long_id, "d2", "never-stored"]})
        assert r.status_code == 200, r.text
        assert r.json()["deleted"] == [long_id, "d2"] and r.json()["missing"] == ["never-stored"]
        assert hits(c, "sleep deprivation") == []
    assert stored(ns, long_id) is None


# ---- disk errors -------------------------------------------------------------------------------------
def test_a_full_disk_under_an_index_is_507_with_the_reason_and_nothing_is_kept(ns: SimpleNamespace) -> None:
    with serve(ns) as c:
        r = c.post("/documents", json={"documents": [{"id": "big-1", "text": f"grows the index {DISK_FULL}"}]})
        assert r.status_code == 507, r.text
        assert "disk is full" in r.json()["message"] and "No space left" in r.json()["message"]
        assert c.get("/documents/big-1").status_code == 404
        ready = c.get("/readyz").json()
        assert ready["status"] == "degraded" and ready["writable"] is False
        assert any("No space left" in p for p in ready["problems"])
        assert metric(c.get("/metrics").text, "streamrank_writable") == 0
        assert metric(c.get("/metrics").text, "streamrank_write_errors_total", reason="full") == 1
        assert c.post("/search", json={"query": "sleep"}).status_code == 200  # reads go on
        assert c.post("/documents", json={"documents": [{"id": "small", "text": "fits"}]}).status_code == 200
        assert c.get("/readyz").json()["status"] == "ready"  # a write that succeeded clears it


@pytest.mark.parametrize(
    ("message", "status", "reason"),
    [("attempt to write a readonly database", 503, "read-only"), ("database or disk is full", 507, "disk is full"),
     ("disk I/O error", 503, "I/O error")],
)
def test_a_store_that_cannot_be_written_answers_with_the_reason(
    ns: SimpleNamespace, monkeypatch: pytest.MonkeyPatch, message: str, status: int, reason: str
) -> None:
    def failing(self, documents):
        raise sqlite3.OperationalError(message)

    with serve(ns) as c:
        monkeypatch.setattr(DocumentStore, "upsert", failing)
        r = c.post("/documents", json={"documents": [{"id": "w1", "text": "words"}]})
        assert r.status_code == status, r.text
        assert reason in r.json()["message"] and message in r.json()["message"] and "document store" in r.json()["message"]
        assert (r.headers.get("retry-after") is not None) == (status == 503)
        assert c.get("/readyz").json()["writable"] is False
        assert hits(c, "words") == []


class _JavaError(Exception):
    """What pyjnius raises: a JavaException with the Java class name and message."""

    def __init__(self, classname: str, message: str) -> None:
        super().__init__(f"JVM exception occurred: {message}\n\tat org.apache.lucene.store.FSDirectory...")
        self.classname, self.innermessage = classname, message


@pytest.mark.parametrize(
    ("error", "problem"),
    [(OSError(28, "No space left on device"), "full"), (OSError(30, "Read-only file system"), "read_only"),
     (sqlite3.OperationalError("database or disk is full"), "full"),
     (sqlite3.OperationalError("attempt to write a readonly database"), "read_only"),
     (_JavaError("java.io.IOException", "No space left on device"), "full"),
     (_JavaError("java.nio.file.FileSystemException", "/x/write.lock: Read-only file system"), "read_only"),
     (_JavaError("java.nio.file.AccessDeniedException", "/x/write.lock"), "read_only"),
     (_JavaError("java.lang.IllegalArgumentException", "immense term"), None),
     (ValueError("refused"), None), (sqlite3.IntegrityError("UNIQUE constraint failed"), None)],
)
def test_disk_problems_are_told_from_refusals(error: Exception, problem: str | None) -> None:
    from streamrank.store import short_message, storage_problem

    assert storage_problem(error) == problem
    assert "\n" not in short_message(error) and "\tat " not in short_message(error)
