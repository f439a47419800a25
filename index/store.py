"""A persisted document store (SQLite, WAL): the corpus every stage reads text from."""

from __future__ import annotations

import hashlib
import sqlite3
import threading
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from streamrank.types import Document

_SCHEMA = """
CREATE TABLE IF NOT EXISTS documents (
    id TEXT PRIMARY KEY,
    title TEXT NOT NULL,
    text TEXT NOT NULL,
    seq INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS documents_seq ON documents(seq);
"""


class DocumentStore:
    """Documents by id, durable once ``upsert`` returns (SQLite WAL with synchronous=FULL).

    ``seq`` keeps insertion order so a rebuilt index visits documents in the order they came.
    Safe to share between threads: one connection, guarded by a lock.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)

    def upsert(self, documents: Iterable[Document]) -> int:
        """Insert or replace documents in one transaction; returns how many were written."""
        with self._lock:
            (next_seq,) = self._db.execute("SELECT COALESCE(MAX(seq), -1) + 1 FROM documents").fetchone()
            rows = [(d.id, d.title, d.text, next_seq + i) for i, d in enumerate(documents)]
            self._db.execute("BEGIN")
            try:
                self._db.executemany(
                    "INSERT INTO documents(id, title, text, seq) VALUES (?, ?, ?, ?) "
                    "ON CONFLICT(id) DO UPDATE SET title=excluded.title, text=excluded.text",
                    rows,
                )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            return len(rows)

    def delete(self, doc_ids: Sequence[str]) -> int:
        with self._lock:
            cur = self._db.executemany("DELETE FROM documents WHERE id = ?", [(i,) for i in doc_ids])
            return cur.rowcount

    def get(self, doc_id: str) -> Document | None:
        with self._lock:
            row = self._db.execute("SELECT id, title, text FROM documents WHERE id = ?", (doc_id,)).fetchone()
        return Document(id=row[0], title=row[1], text=row[2]) if row else None

    def get_many(self, doc_ids: Sequence[str]) -> dict[str, Document]:
        found: dict[str, Document] = {}
        ids = list(dict.fromkeys(doc_ids))
        with self._lock:
            for start in range(0, len(ids), 500):
                chunk = ids[start : start + 500]
                marks = ",".join("?" * len(chunk))
                for row in self._db.execute(
                    f"SELECT id, title, text FROM documents WHERE id IN ({marks})", chunk
                ):
                    found[row[0]] = Document(id=row[0], title=row[1], text=row[2])
        return found

    def __contains__(self, doc_id: object) -> bool:
        with self._lock:
            return self._db.execute("SELECT 1 FROM documents WHERE id = ?", (doc_id,)).fetchone() is not None

    def __len__(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM documents").fetchone()[0]

    def __iter__(self) -> Iterator[Document]:
        with self._lock:
            rows = self._db.execute("SELECT id, title, text FROM documents ORDER BY seq").fetchall()
        for row in rows:
            yield Document(id=row[0], title=row[1], text=row[2])

    def ids(self) -> list[str]:
        with self._lock:
            return [r[0] for r in self._db.execute("SELECT id FROM documents ORDER BY seq")]

    def checksum(self) -> str:
        """SHA-256 over (id, title, text) in id order: identifies the corpus an index was built from."""
        digest = hashlib.sha256()
        with self._lock:
            for doc_id, title, text in self._db.execute("SELECT id, title, text FROM documents ORDER BY id"):
                for part in (doc_id, title, text):
                    digest.update(part.encode())
                    digest.update(b"\0")
        return digest.hexdigest()

    def close(self) -> None:
        with self._lock:
            self._db.close()
