"""The document store's incremental corpus identity (issue 24): exact, order-independent, O(written)."""

from __future__ import annotations

import random
import sqlite3
from pathlib import Path

from streamrank.index import manifest as mf
from streamrank.store import IDENTITY_PREFIX, DocumentStore
from streamrank.types import Document


def _docs(n: int, tag: str = "") -> list[Document]:
    return [Document(id=f"d{i}", text=f"text {i} {tag}", title=f"t{i % 7}") for i in range(n)]


def _fresh_identity(documents: list[Document]) -> str:
    store = DocumentStore(":memory:")
    try:
        store.upsert(documents)
        return store.checksum()
    finally:
        store.close()


def test_identity_follows_every_write_and_ignores_order(tmp_path: Path) -> None:
    store = DocumentStore(tmp_path / "docs.sqlite")
    docs = _docs(50)
    shuffled = docs[:]
    random.Random(24).shuffle(shuffled)
    store.upsert(shuffled[:30])
    store.upsert(docs)  # overlaps: replacements of identical documents, another order
    assert store.checksum() == _fresh_identity(docs) and store.checksum().startswith(IDENTITY_PREFIX)

    changed = Document(id="d3", text="a new text")
    previous = store.get_many(["d3", "new"])
    store.upsert([changed, Document(id="new", text="fresh")])
    expected = [changed if d.id == "d3" else d for d in docs] + [Document(id="new", text="fresh")]
    assert store.checksum() == _fresh_identity(expected) != _fresh_identity(docs)

    store.restore(["d3", "new"], previous)  # the undo of a refused write
    assert store.checksum() == _fresh_identity(docs)
    assert store.delete(["d1", "d2", "missing"]) == 2
    assert store.checksum() == _fresh_identity([d for d in docs if d.id not in {"d1", "d2"}])
    store.delete([d.id for d in docs])
    assert store.checksum() == _fresh_identity([])
    store.close()


def test_identity_survives_a_reopen_and_a_store_from_an_older_version_is_migrated(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite"
    db = sqlite3.connect(path)  # the schema before the incremental identity
    db.executescript("CREATE TABLE documents (id TEXT PRIMARY KEY, title TEXT NOT NULL, text TEXT NOT NULL, "
                     "seq INTEGER NOT NULL);")
    docs = _docs(20)
    db.executemany("INSERT INTO documents VALUES (?, ?, ?, ?)", [(d.id, d.title, d.text, i) for i, d in enumerate(docs)])
    db.commit()
    db.close()
    store = DocumentStore(path)
    assert store.checksum() == _fresh_identity(docs) and [d.id for d in store] == [d.id for d in docs]
    store.upsert([Document(id="x", text="y")])
    store.close()
    again = DocumentStore(path)
    assert again.checksum() == _fresh_identity([*docs, Document(id="x", text="y")])
    again.close()


def test_a_manifest_of_the_older_checksum_kind_is_recognised(tmp_path: Path) -> None:
    store = DocumentStore(tmp_path / "docs.sqlite")
    store.upsert(_docs(5))
    legacy = store.legacy_checksum()
    assert mf.is_legacy_checksum({"corpus_checksum": legacy})
    assert not mf.is_legacy_checksum({"corpus_checksum": store.checksum()})
    assert mf.legacy_checksum(_docs(5)) == legacy != mf.legacy_checksum(_docs(5, "other"))
    store.close()
