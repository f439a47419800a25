"""A persisted document store (SQLite, WAL): the corpus every stage reads text from.

Also what the write path needs to tell a disk problem from a refused document: :class:`StorageError`
(the store or an index folder cannot be written: full, read-only, I/O error) and
:func:`storage_problem`, which recognises one in SQLite, OS and Java (Lucene) exceptions.
"""

from __future__ import annotations

import errno
import hashlib
import sqlite3
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Literal

from streamrank.errors import StreamRankError
from streamrank.types import Document

Problem = Literal["full", "read_only", "io"]

_ERRNO_PROBLEMS: dict[int, Problem] = {
    errno.ENOSPC: "full",
    errno.EDQUOT: "full",
    errno.EFBIG: "full",
    errno.EROFS: "read_only",
    errno.EACCES: "read_only",
    errno.EPERM: "read_only",
    errno.EIO: "io",
}
_TEXT_PROBLEMS: tuple[tuple[str, Problem], ...] = (
    ("no space left", "full"),
    ("disk is full", "full"),
    ("disk quota", "full"),
    ("file too large", "full"),
    ("read-only file system", "read_only"),
    ("readonly database", "read_only"),
    ("read-only", "read_only"),
    ("permission denied", "read_only"),
    ("accessdenied", "read_only"),
    ("disk i/o error", "io"),
    ("unable to open database", "io"),
)
_JAVA_IO = ("java.io.", "java.nio.file.", "org.apache.lucene.store.")


class StorageError(StreamRankError):
    """The document store or an index folder could not be written (``problem``: full, read_only, io).

    Raised by the write path after it undid what it could; nothing of the failed write is kept.
    """

    def __init__(self, message: str, problem: Problem, where: str) -> None:
        super().__init__(message)
        self.problem: Problem = problem
        self.where = where


def short_message(exc: BaseException, limit: int = 300) -> str:
    """One line saying what ``exc`` was, without a (Java) stack trace: safe to show a client."""
    classname = getattr(exc, "classname", None)  # jnius.JavaException
    if classname:
        text = f"{classname}: {getattr(exc, 'innermessage', None) or ''}".strip().rstrip(":")
    else:
        text = str(exc).strip() or type(exc).__name__
    line = text.splitlines()[0] if text else type(exc).__name__
    return line if len(line) <= limit else line[: limit - 3] + "..."


def storage_problem(exc: BaseException) -> Problem | None:
    """``full``, ``read_only`` or ``io`` when ``exc`` (or what caused it) is a disk problem, else None.

    Knows OSError errnos, SQLite's messages ("database or disk is full", "attempt to write a
    readonly database") and Java I/O exceptions as pyjnius raises them (``classname``).
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, StorageError):
            return current.problem
        if isinstance(current, OSError) and current.errno in _ERRNO_PROBLEMS:
            return _ERRNO_PROBLEMS[current.errno]
        classname = getattr(current, "classname", None) or ""
        disk_kind = isinstance(current, OSError | sqlite3.OperationalError | sqlite3.DatabaseError) or (
            classname.startswith(_JAVA_IO) or "AlreadyClosed" in classname
        )
        if disk_kind:
            text = f"{classname} {getattr(current, 'innermessage', '') or ''} {current}".lower()
            for fragment, problem in _TEXT_PROBLEMS:
                if fragment in text:
                    return problem
            if classname or isinstance(current, OSError):
                return "io"
        current = current.__cause__ or current.__context__
    return None

_SCHEMA = """
CREATE TABLE IF NOT EXISTS documents (
    id TEXT PRIMARY KEY,
    title TEXT NOT NULL,
    text TEXT NOT NULL,
    seq INTEGER NOT NULL,
    hash BLOB
);
CREATE INDEX IF NOT EXISTS documents_seq ON documents(seq);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


_UPSERT = (
    "INSERT INTO documents(id, title, text, seq, hash) VALUES (?, ?, ?, ?, ?) "
    "ON CONFLICT(id) DO UPDATE SET title=excluded.title, text=excluded.text, hash=excluded.hash"
)
IDENTITY_PREFIX = "ms1:"
"""Marks a corpus identity of :meth:`DocumentStore.checksum` (older manifests hold a plain SHA-256)."""
_MODULUS = 2**256


def document_hash(doc_id: str, title: str, text: str) -> bytes:
    """SHA-256 of one document's (id, title, text): its share of the corpus identity."""
    digest = hashlib.sha256()
    for part in (doc_id, title, text):
        digest.update(part.encode())
        digest.update(b"\0")
    return digest.digest()


def _value(digest: bytes | None) -> int:
    return int.from_bytes(digest, "big") if digest else 0


class _Transaction:
    """BEGIN ... COMMIT, or ROLLBACK on error (only while SQLite still has the transaction open: a
    failed COMMIT on a full disk may already have rolled back, and a second ROLLBACK would hide why)."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")  # the identity is read and written in it: take the write lock now

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            try:
                self._db.execute("COMMIT")
                return
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise
        if self._db.in_transaction:
            self._db.execute("ROLLBACK")


class DocumentStore:
    """Documents by id, durable once ``upsert`` returns (SQLite WAL with synchronous=FULL).

    ``seq`` keeps insertion order so a rebuilt index visits documents in the order they came.
    The corpus identity (:meth:`checksum`) is kept incrementally: each row holds the SHA-256 of its
    document and ``meta`` their sum modulo 2**256, updated in the transaction of every write, so a
    write costs O(documents written) and reading the identity O(1).
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
        self._migrate()

    def _migrate(self) -> None:
        """Give a store written before the incremental identity its hashes and identity (once)."""
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(documents)")}
        if self._identity() is not None and "hash" in columns:
            return
        with self._lock, self._transaction():
            if "hash" not in columns:
                self._db.execute("ALTER TABLE documents ADD COLUMN hash BLOB")
            rows = self._db.execute("SELECT id, title, text FROM documents WHERE hash IS NULL").fetchall()
            self._db.executemany(
                "UPDATE documents SET hash = ? WHERE id = ?", [(document_hash(*row), row[0]) for row in rows]
            )
            total = sum(_value(h) for (h,) in self._db.execute("SELECT hash FROM documents"))
            self._set_identity(total % _MODULUS)

    def _identity(self) -> int | None:
        row = self._db.execute("SELECT value FROM meta WHERE key = 'identity'").fetchone()
        return int(row[0], 16) if row else None

    def _set_identity(self, value: int) -> None:
        self._db.execute(
            "INSERT INTO meta(key, value) VALUES ('identity', ?) ON CONFLICT(key) DO UPDATE SET value=excluded.value",
            (f"{value:064x}",),
        )

    def _hash_sum(self, doc_ids: Sequence[str]) -> int:
        """Sum of the stored hashes of those of ``doc_ids`` the store holds (inside the transaction)."""
        total = 0
        ids = list(dict.fromkeys(doc_ids))
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            marks = ",".join("?" * len(chunk))
            for (digest,) in self._db.execute(f"SELECT hash FROM documents WHERE id IN ({marks})", chunk):
                total += _value(digest)
        return total

    def _write(self, gone: Sequence[str], documents: Sequence[Document]) -> int:
        """Delete ``gone`` and upsert ``documents`` in one transaction, the identity updated with them;
        returns how many rows the delete removed."""
        rows = [(d.id, d.title, d.text, 0, document_hash(d.id, d.title, d.text)) for d in documents]
        with self._lock, self._transaction():
            identity = self._identity() or 0
            identity -= self._hash_sum([*gone, *(d.id for d in documents)])
            removed = self._db.executemany("DELETE FROM documents WHERE id = ?", [(i,) for i in gone]).rowcount
            (next_seq,) = self._db.execute("SELECT COALESCE(MAX(seq), -1) + 1 FROM documents").fetchone()
            self._db.executemany(_UPSERT, [(*row[:3], next_seq + n, row[4]) for n, row in enumerate(rows)])
            identity += sum(_value(row[4]) for row in rows)
            self._set_identity(identity % _MODULUS)
        return max(0, removed)

    def upsert(self, documents: Iterable[Document]) -> int:
        """Insert or replace documents in one transaction; returns how many were written."""
        latest = list({d.id: d for d in documents}.values())
        self._write((), latest)
        return len(latest)

    def delete(self, doc_ids: Sequence[str]) -> int:
        """Remove documents in one transaction; returns how many were stored."""
        return self._write(list(dict.fromkeys(doc_ids)), ())

    def restore(self, doc_ids: Sequence[str], previous: Mapping[str, Document]) -> None:
        """Put ``doc_ids`` back as they were: ``previous[id]`` where it has one, absent otherwise
        (one transaction; undoes a write an index refused)."""
        self._write([i for i in doc_ids if i not in previous], list(previous.values()))

    def _transaction(self) -> _Transaction:
        return _Transaction(self._db)

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
        """The corpus identity an index manifest records: ``ms1:`` + the sum modulo 2**256 of every
        document's :func:`document_hash` (order-independent, kept up to date by every write; O(1))."""
        with self._lock:
            return f"{IDENTITY_PREFIX}{self._identity() or 0:064x}"

    def legacy_checksum(self) -> str:
        """The identity manifests recorded before ``ms1:`` (SHA-256 over (id, title, text) in id order;
        a full scan): read only to accept an index built by an older version."""
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
