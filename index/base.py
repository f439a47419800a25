"""What stages with an index share: the index lifecycle, and for retrievers the batch dispatch.

:class:`IndexedStage` (BM25, dense, the PPR corpus graph) keeps an index under
``<index_dir>/<index>``. A subclass says how to write its index into a folder, open it and apply
additions and deletions; this base does everything around that once:

- ``build``: reuse a matching index (no re-encoding), refuse a mismatching one, else build into a
  staging folder that replaces the old index only when complete;
- opening at search time: IndexMissingError / IndexMismatchError with the fix in the message, and
  a reopen whenever the manifest on disk changes (another process rebuilt or updated the index);
- ``add``/``delete``: under the folder's lock, then the manifest's doc count and corpus identity
  updated (the store keeps that identity incrementally: O(documents written), no scan);
- ``indexed_ids`` and ``close``.

:class:`IndexedRetriever` (BM25, dense) adds retrieval: a subclass says how to search its index
and score a supplied pool; ``run`` searches rankings without candidates and rescores exactly the
pool of rankings with candidates, both halves of a mixed batch in one call each.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, ClassVar, Protocol

from pydantic import Field

from streamrank.errors import IndexMismatchError
from streamrank.index import manifest as mf
from streamrank.stage import BaseStage, StageConfig
from streamrank.store import DocumentStore
from streamrank.types import Candidate, Document, Ranking


class IndexedConfig(StageConfig):
    index: str | None = None
    """Sub-folder of the pipeline's index_dir for this index (default: the stage kind, e.g. ``bm25``)."""
    k: int = Field(100, ge=1)


class IndexedStage(BaseStage):
    """Base for stages that keep an index under ``<index_dir>/<index>``: its folder, manifest and
    lifecycle (build, open, add, delete, close)."""

    libraries: ClassVar[tuple[str, ...]] = ()
    """Distributions whose versions go into the manifest."""
    AT_LEAST_SETTINGS: ClassVar[tuple[str, ...]] = ()
    """List settings an index may hold more of than a pipeline asks for (see ``check_settings``)."""
    WRITES_TAKE_LOCK: ClassVar[bool] = True
    """``_add``/``_delete`` run holding :attr:`lock` (searches wait for them). False: the subclass
    takes the lock itself only where it changes what searches read (dense: not while it fsyncs)."""
    config: IndexedConfig

    def __init__(self, config: IndexedConfig, context: Any) -> None:
        super().__init__(config, context)
        self._stamp: tuple[int, int, int] | None = None
        self._manifest: dict[str, Any] | None = None
        self._own_lock = threading.RLock()
        self._libraries: dict[str, str] | None = None
        self._build_checksum: str | None = None
        """Corpus checksum of the build in progress (set before ``_write`` is called)."""

    # ---- what subclasses provide --------------------------------------------------------------
    def settings(self) -> dict[str, Any]:
        """Build-time settings that must match between the index on disk and this stage ("kind" first)."""
        raise NotImplementedError

    def _write(self, folder: Path, documents: list[Document]) -> dict[str, Any]:
        """Write a new index of ``documents`` into the empty ``folder``; returns manifest ``info``."""
        raise NotImplementedError

    def _open(self, folder: Path, manifest: dict[str, Any]) -> None:
        """Load the index in ``folder`` (called again after it changed on disk)."""
        raise NotImplementedError

    def _release(self) -> None:
        """Drop what ``_open`` loaded."""

    def _add(self, documents: Sequence[Document]) -> dict[str, Any]:
        """Add or replace ``documents`` in the open index and persist; returns updated manifest ``info``."""
        raise NotImplementedError

    def _prepare_add(self, documents: Sequence[Document]) -> Any:
        """Expensive work for ``_add`` that needs no lock (dense: encoding); passed on as ``_add``'s
        second argument unless None."""
        return None

    def _delete(self, doc_ids: Sequence[str]) -> dict[str, Any]:
        """Remove ``doc_ids`` from the open index and persist; returns updated manifest ``info``."""
        raise NotImplementedError

    def _live_ids(self) -> list[str]:
        """Ids of the documents the open index holds."""
        raise NotImplementedError

    # ---- folder and manifest ------------------------------------------------------------------
    @property
    def folder(self) -> Path:
        return self.context.require_index_dir(f"the {self.name!r} stage") / (
            self.config.index or self.config.kind
        )

    @property
    def lock(self) -> threading.RLock:
        """The index folder's lock (shared by every stage on that folder in this process)."""
        if self.context.index_dir is None:
            return self._own_lock
        return mf.folder_lock(self.folder)

    def manifest(self) -> dict[str, Any]:
        """The manifest of the open index (opening it if needed)."""
        self._ensure_open()
        assert self._manifest is not None
        return self._manifest

    def _ensure_open(self) -> None:
        """Open the index, or reopen it when its manifest changed on disk since it was loaded."""
        folder = self.folder
        stamp = mf.manifest_stamp(folder)
        if stamp is not None and stamp == self._stamp:
            return
        with self.lock:
            stamp = mf.manifest_stamp(folder)
            if stamp is not None and stamp == self._stamp:
                return
            manifest = mf.require_manifest(folder, self.config.kind)
            mf.check_settings(manifest, self.settings(), folder, self.AT_LEAST_SETTINGS)
            self._follow(folder, manifest)
            self._manifest, self._stamp = manifest, stamp

    def _follow(self, folder: Path, manifest: dict[str, Any]) -> None:
        """Move to the index ``manifest`` describes (first open, or another process wrote): reopen it.
        An index with an append-only log overrides this to apply only what was appended."""
        self._release()
        self._open(folder, manifest)

    def manifest_checksum(self) -> str | None:
        """The corpus identity the open index's manifest records (compaction keeps it: same documents)."""
        return (self._manifest or {}).get("corpus_checksum")

    def _save_manifest(self, info: dict[str, Any], checksum: str | None) -> None:
        """Write the manifest (synced outside :attr:`lock`; swapped in and noted under it, so a search
        never takes this process's own write for another process's and reloads)."""
        import os

        old = self._manifest or {}
        new = mf.make_manifest(
            self.settings(),
            doc_count=int(info.get("doc_count", 0)),
            checksum=checksum,
            libraries=self.library_versions(),
            info=info,
            created=old.get("created"),
        )
        path = self.folder / mf.MANIFEST_NAME
        tmp = mf.prepare_atomic(path, mf.json_writer(new))
        with self.lock:
            try:
                os.replace(tmp, path)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
            self._manifest, self._stamp = new, mf.manifest_stamp(self.folder)

    def library_versions(self) -> dict[str, str]:
        if self._libraries is None:  # importlib.metadata reads the installed distributions: once
            self._libraries = mf.library_versions(*self.libraries)
        return dict(self._libraries)

    # ---- lifecycle ----------------------------------------------------------------------------
    def build(self, documents: Iterable[Document], *, rebuild: bool = False) -> None:
        """Build the index over ``documents``; a matching existing index is kept as is (no encoding).

        Raises IndexMismatchError when an index exists with other settings or another corpus and
        ``rebuild`` is False.
        """
        folder = self.folder
        with mf.writer_lock(folder), self.lock:  # always the writer lock first (no lock-order deadlock)
            existing = mf.read_manifest(folder)
            if existing is not None and not rebuild:
                mf.check_settings(existing, self.settings(), folder, self.AT_LEAST_SETTINGS)
                self._check_corpus(existing, documents)
                return
            docs, checksum = mf.materialize(documents)
            self._build_checksum = checksum  # for _write (dense reuses a sibling's embeddings of this corpus)
            with mf.staging_folder(folder) as staging:
                info = self._write(staging, docs)
                manifest = mf.make_manifest(
                    self.settings(),
                    doc_count=int(info.get("doc_count", len(docs))),
                    checksum=checksum,
                    libraries=self.library_versions(),
                    info=info,
                )
                mf.write_json_atomic(staging / mf.MANIFEST_NAME, manifest)
            self._release()
            self._stamp = self._manifest = None

    def _check_corpus(self, manifest: dict[str, Any], documents: Iterable[Document]) -> None:
        """Raise IndexMismatchError unless the index described by ``manifest`` holds ``documents``."""
        if isinstance(documents, DocumentStore):
            checksum, count = documents.checksum(), len(documents)
        else:
            docs, checksum = mf.materialize(documents)
            count = len(docs)
        if manifest.get("corpus_checksum") is None:  # after an incremental update: compare ids instead
            self._ensure_open()
            with self.lock:
                live = set(self._live_ids())
            wanted = set(documents.ids()) if isinstance(documents, DocumentStore) else {d.id for d in docs}
            if live != wanted:
                raise IndexMismatchError(
                    f"the {self.config.kind} index at {self.folder} holds {len(live - wanted)} documents the "
                    f"corpus lacks and lacks {len(wanted - live)} of its documents; run Pipeline.recover() "
                    f"or {mf.REBUILD_HINT}"
                )
            self._save_manifest(dict(self._manifest["info"]), checksum)  # type: ignore[index]
            return
        if mf.is_legacy_checksum(manifest) and manifest["corpus_checksum"] == mf.legacy_checksum(
            documents if isinstance(documents, DocumentStore) else docs
        ):  # built by an older version from this corpus: record today's identity, keep the index
            self._ensure_open()
            self._save_manifest(dict(self._manifest["info"]), checksum)  # type: ignore[index]
            return
        mf.check_corpus(manifest, checksum, count, self.folder)

    def add(self, documents: Sequence[Document]) -> None:
        """Add or replace ``documents`` without a rebuild (the store should already hold them)."""
        if not documents:
            return
        documents = list({d.id: d for d in documents}.values())
        self._ensure_open()
        prepared = self._prepare_add(documents)  # model work outside the locks: searches go on meanwhile
        with mf.writer_lock(self.folder), self._write_guard():
            self._ensure_open()  # picks up changes another process made
            with self._reload_on_error():
                info = self._add(documents) if prepared is None else self._add(documents, prepared)
                self._save_manifest(info, mf.store_checksum_after(self.context.store, added=documents))

    def delete(self, doc_ids: Sequence[str]) -> None:
        """Remove ``doc_ids`` (unknown ids are ignored)."""
        if not doc_ids:
            return
        self._ensure_open()
        with mf.writer_lock(self.folder), self._write_guard():
            self._ensure_open()  # picks up changes another process made
            with self._reload_on_error():
                info = self._delete(list(dict.fromkeys(doc_ids)))
                self._save_manifest(info, mf.store_checksum_after(self.context.store, deleted=doc_ids))

    def _write_guard(self) -> Any:
        """:attr:`lock` around a write unless the subclass takes it itself (``WRITES_TAKE_LOCK``)."""
        return self.lock if self.WRITES_TAKE_LOCK else nullcontext()

    @contextmanager
    def _reload_on_error(self) -> Iterator[None]:
        """If an update fails half way, forget the in-memory state: the next use reloads the files."""
        try:
            yield
        except BaseException:
            self._forget()
            raise

    def _forget(self) -> None:
        """Drop the in-memory index: the next use reloads it from disk."""
        with self.lock:
            self._release()
            self._stamp = self._manifest = None

    def indexed_ids(self) -> list[str]:
        """Ids of every document in the index (Pipeline.recover compares them with the store)."""
        self._ensure_open()
        with self.lock:
            return self._live_ids()

    def _try_open(self) -> bool:
        """Open the index if there is one; False when the pipeline has no index_dir or it was never built.

        A mismatching index still raises: scoring a pool against the wrong index would be silently wrong.
        """
        if self.context.index_dir is None or mf.read_manifest(self.folder) is None:
            return False
        self._ensure_open()
        return True

    def close(self) -> None:
        if self.context.index_dir is None:
            return
        with self.lock:
            self._release()
            self._stamp = self._manifest = None


class IndexedRetriever(IndexedStage):
    """Base for retrievers with an index: searches it for empty rankings, rescores supplied pools."""

    shardable = True  # `shards = N` in a pipeline: one index per shard (streamrank.index.sharded_stage)

    # ---- what subclasses provide --------------------------------------------------------------
    def _prepare(self, rankings: Sequence[Ranking]) -> Any:
        """Work shared by both halves of a batch (dense: encode every query once)."""
        return None

    def _search(self, rankings: Sequence[Ranking], prepared: Any, k: int) -> list[list[tuple[str, float]]]:
        """Best ``k`` (doc id, score) per query from the open index, best first."""
        raise NotImplementedError

    def _score_pool(self, rankings: Sequence[Ranking], prepared: Any) -> list[list[float]]:
        """One score per supplied candidate, per ranking (may add notes to the rankings)."""
        raise NotImplementedError

    # ---- the retriever protocol (what sharding calls, here and in a shard's process) ------------
    def prepare(self, rankings: Sequence[Ranking]) -> Any:
        """Work shared by every shard and both halves of a batch (dense: the query vectors)."""
        return self._prepare(rankings)

    def search(self, rankings: Sequence[Ranking], prepared: Any, k: int) -> list[list[tuple[str, float]]]:
        """Best ``k`` (doc id, score) per query, best first; the index (re)opened first if it changed."""
        self._ensure_open()
        with self.lock:
            self._ensure_open()
            return self._search(rankings, prepared, k)

    def score_pool(self, rankings: Sequence[Ranking], prepared: Any) -> list[list[float]]:
        """One score per supplied candidate, per ranking (may add notes to the rankings)."""
        return self._score_pool(rankings, prepared)

    # ---- retrieval ----------------------------------------------------------------------------
    def run(self, rankings: Sequence[Ranking]) -> list[Ranking]:
        """Search the index for empty rankings; rescore exactly the supplied pool of the others."""
        return self._run(rankings, self.config.k)

    def run_top(self, rankings: Sequence[Ranking], k: int) -> list[Ranking]:
        """Search only ``k`` deep when nothing after this stage needs more (a request's top ``k``)."""
        return self._run(rankings, max(1, min(k, self.config.k)))

    def _run(self, rankings: Sequence[Ranking], depth: int) -> list[Ranking]:
        if any(not r.candidates for r in rankings):
            self._ensure_open()  # a missing index fails before any model work
        return run_retriever(self, rankings, depth, self.config.k)


class Retriever(Protocol):
    """What :func:`run_retriever` (and a sharded stage, over its shards) calls on a retriever."""

    name: str

    def prepare(self, rankings: Sequence[Ranking]) -> Any: ...

    def search(self, rankings: Sequence[Ranking], prepared: Any, k: int) -> list[list[tuple[str, float]]]: ...

    def score_pool(self, rankings: Sequence[Ranking], prepared: Any) -> list[list[float]]: ...


def run_retriever(retriever: Retriever, rankings: Sequence[Ranking], depth: int, keep: int) -> list[Ranking]:
    """The one retrieval step of every retriever, sharded or not: queries prepared once, empty rankings
    searched ``depth`` deep, supplied pools rescored exactly (``keep`` of them kept)."""
    out = list(rankings)
    empty = [i for i, r in enumerate(rankings) if not r.candidates]
    pooled = [i for i, r in enumerate(rankings) if r.candidates]
    prepared = retriever.prepare(rankings)
    if empty:
        hits = retriever.search([rankings[i] for i in empty], select_prepared(prepared, empty), depth)
        for i, found in zip(empty, hits, strict=True):
            fresh = [Candidate(doc_id=d, score=s, rank=r) for r, (d, s) in enumerate(found, start=1)]
            out[i] = rankings[i].rescored(retriever.name, [s for _, s in found], keep=depth, candidates=fresh)
    if pooled:
        scores = retriever.score_pool([rankings[i] for i in pooled], select_prepared(prepared, pooled))
        for i, pool_scores in zip(pooled, scores, strict=True):
            out[i] = rankings[i].rescored(retriever.name, pool_scores, keep=keep)
    return out


def select_prepared(prepared: Any, positions: list[int]) -> Any:
    """The rows of a per-query ``prepared`` array/list for the given batch positions (None stays None)."""
    if prepared is None:
        return None
    if hasattr(prepared, "shape"):
        return prepared[positions]
    return [prepared[i] for i in positions]
