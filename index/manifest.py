"""``manifest.json``: what an index on disk was built from, checked before it is used.

Every index folder (``<index_dir>/bm25``, ``<index_dir>/dense``...) holds one. It records the
settings that decide the index's contents (``settings``: analyzer, model, FAISS type and build
parameters; never search-time knobs such as BM25's k1/b), the corpus it was built from (document
count and ``DocumentStore.checksum()``), library versions and the creation time. A pipeline that
asks for other settings gets an :class:`IndexMismatchError` naming the field, both values and the
fix, instead of silently searching an index built for something else.

Files are replaced atomically (temp file, fsync, ``os.replace``), so a crash leaves either the old
or the new version, never half of one.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from streamrank.errors import IndexMismatchError, IndexMissingError

if TYPE_CHECKING:
    from streamrank.store import DocumentStore
    from streamrank.types import Document

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1
REBUILD_HINT = (
    "rebuild it with `streamrank index --pipeline <pipeline file> --rebuild` "
    "(Pipeline.index(rebuild=True)) or point the pipeline at another index_dir"
)

_locks: dict[Path, threading.RLock] = {}
_locks_guard = threading.Lock()


def folder_lock(folder: Path) -> threading.RLock:
    """One re-entrant lock per index folder for the whole process (stages of several pipelines share it)."""
    key = Path(folder).resolve()
    with _locks_guard:
        return _locks.setdefault(key, threading.RLock())


def library_versions(*distributions: str) -> dict[str, str]:
    """Installed versions of the named distributions ("not installed" for missing ones)."""
    found = {}
    for name in distributions:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def prepare_atomic(path: Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a temp file next to ``path`` and fsync it; returns the temp file, for the
    caller to ``os.replace`` over ``path`` (removed again on an error)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a temp file next to ``path``, fsync it, then ``os.replace`` it into place."""
    tmp = prepare_atomic(path, write)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def json_writer(data: Any) -> Callable[[Path], None]:
    return lambda tmp: tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def write_json_atomic(path: Path, data: Any) -> None:
    write_atomic(path, json_writer(data))


def read_manifest(folder: Path) -> dict[str, Any] | None:
    """The manifest of ``folder``, or None when there is no (complete) index there."""
    path = Path(folder) / MANIFEST_NAME
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None


def require_manifest(folder: Path, kind: str) -> dict[str, Any]:
    """The manifest of ``folder``; IndexMissingError telling how to build the index when absent."""
    manifest = read_manifest(folder)
    if manifest is None:
        raise IndexMissingError(
            f"no {kind} index at {folder}: build it with `streamrank index --pipeline <pipeline file>` "
            "(or Pipeline.index())"
        )
    return manifest


def make_manifest(
    settings: Mapping[str, Any],
    *,
    doc_count: int,
    checksum: str | None,
    libraries: Mapping[str, str],
    info: Mapping[str, Any] | None = None,
    created: str | None = None,
) -> dict[str, Any]:
    """A manifest dict. ``info`` holds facts found while building (dimension, rows...), never compared."""
    now = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    return {
        "format": FORMAT_VERSION,
        "kind": settings["kind"],
        "settings": dict(settings),
        "doc_count": doc_count,
        "corpus_checksum": checksum,
        "libraries": dict(libraries),
        "info": dict(info or {}),
        "created": created or now,
        "updated": now,
        "generation": uuid.uuid4().hex,
    }


def check_settings(
    manifest: Mapping[str, Any], settings: Mapping[str, Any], folder: Path, at_least: Collection[str] = ()
) -> None:
    """Raise IndexMismatchError for the first setting the index was built with differently.

    A list setting named in ``at_least`` matches when the index has every item asked for (more is fine).
    """
    built = manifest.get("settings", {})
    for field in [*settings, *(f for f in built if f not in settings)]:  # most telling fields first
        old, new = built.get(field), settings.get(field)
        if field in at_least and isinstance(old, list) and isinstance(new, list) and set(new) <= set(old):
            continue
        if old != new:
            raise IndexMismatchError(
                f"the {settings.get('kind', 'index')} index at {folder} was built with {field} = {old!r}, "
                f"but this pipeline asks for {field} = {new!r}; {REBUILD_HINT}"
            )


def check_corpus(manifest: Mapping[str, Any], checksum: str, doc_count: int, folder: Path) -> None:
    """Raise IndexMismatchError when the index was built from another corpus than ``checksum``'s."""
    if manifest.get("corpus_checksum") != checksum:
        raise IndexMismatchError(
            f"the {manifest.get('kind', '')} index at {folder} was built from another corpus "
            f"({manifest.get('doc_count')} documents, checksum {str(manifest.get('corpus_checksum'))[:12]}) "
            f"than the document store holds ({doc_count} documents, checksum {checksum[:12]}); {REBUILD_HINT}"
        )


def is_legacy_checksum(manifest: Mapping[str, Any]) -> bool:
    """Whether the manifest records a corpus checksum of the older, full-scan kind."""
    from streamrank.store import IDENTITY_PREFIX

    recorded = manifest.get("corpus_checksum")
    return isinstance(recorded, str) and not recorded.startswith(IDENTITY_PREFIX)


def legacy_checksum(documents: Iterable[Document]) -> str:
    """The older full-scan checksum of ``documents`` (``DocumentStore.legacy_checksum``)."""
    from streamrank.store import DocumentStore

    if isinstance(documents, DocumentStore):
        return documents.legacy_checksum()
    scratch = DocumentStore(":memory:")
    try:
        scratch.upsert(documents)
        return scratch.legacy_checksum()
    finally:
        scratch.close()


def materialize(documents: Iterable[Document]) -> tuple[list[Document], str]:
    """The documents as a list (last version of each id, first-seen order) and their corpus checksum.

    A DocumentStore gives its own checksum; other iterables are checksummed through a temporary
    in-memory store so the definition lives in one place (``DocumentStore.checksum``).
    """
    from streamrank.store import DocumentStore

    if isinstance(documents, DocumentStore):
        return list(documents), documents.checksum()
    scratch = DocumentStore(":memory:")
    try:
        scratch.upsert(documents)
        return list(scratch), scratch.checksum()
    finally:
        scratch.close()


def store_checksum_after(
    store: DocumentStore, added: Sequence[Document] = (), deleted: Sequence[str] = ()
) -> str | None:
    """The store's checksum if it already reflects an add/delete (it should: the store is written
    first), else None, meaning "unknown": the next ``build`` then compares document ids instead.
    O(documents written): the store keeps its identity incrementally."""
    if any(doc_id in store for doc_id in deleted):
        return None
    found = store.get_many([d.id for d in added])
    if any(found.get(d.id) != d for d in added):
        return None
    return store.checksum()


@contextmanager
def writer_lock(folder: Path) -> Iterator[None]:
    """Exclusive lock, across processes, for whoever builds or updates the index in ``folder``.

    Two processes sharing an index_dir (the service and ``streamrank eval``, or two engineers) then
    build it once: the second waits, finds a matching manifest and keeps it.
    """
    import fcntl

    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / f".{folder.name}.lock", "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextmanager
def staging_folder(target: Path) -> Iterator[Path]:
    """A fresh sibling folder to build into; moved over ``target`` when the block succeeds.

    The old index stays in place until the new one is complete; a crash in between leaves at most a
    stray ``*.building-*`` folder (removed by the next build) and never a half-written index. Hold
    :func:`writer_lock` around it.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f"{target.name}.building-{os.getpid()}")
    for stray in target.parent.glob(f"{target.name}.building-*"):
        shutil.rmtree(stray, ignore_errors=True)
    staging.mkdir()
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    retired = target.with_name(f"{target.name}.old-{os.getpid()}")
    if target.exists():
        os.replace(target, retired)
    os.replace(staging, target)
    shutil.rmtree(retired, ignore_errors=True)


def manifest_stamp(folder: Path) -> tuple[int, int, int] | None:
    """A cheap fingerprint of the manifest file (inode, size, mtime): changes whenever it is rewritten."""
    try:
        st = (Path(folder) / MANIFEST_NAME).stat()
    except FileNotFoundError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)
