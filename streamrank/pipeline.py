"""A pipeline: stages run in order over a batch of queries. The one object all front ends share."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from streamrank.context import PipelineContext
from streamrank.errors import ConfigError, InvalidQueryError, StreamRankError
from streamrank.stage import BaseStage
from streamrank.store import StorageError, short_message, storage_problem
from streamrank.types import Candidate, Document, Query, Ranking

QueryLike = str | Query
log = logging.getLogger("streamrank.pipeline")


def as_query(query: QueryLike, index: int = 0, user_history: Sequence[str] = ()) -> Query:
    """Accept a plain string or a Query; reject empty text."""
    if isinstance(query, Query):
        q = query
    elif isinstance(query, str):
        q = Query(id=f"q{index}", text=query, user_history=tuple(user_history))
    else:
        raise InvalidQueryError(f"a query must be a string or a Query, got {type(query).__name__}")
    if not q.text or not q.text.strip():
        raise InvalidQueryError("the query is empty")
    return q


def candidate_pool(query: QueryLike, documents: Sequence[Document | str]) -> Ranking:
    """A ranking of supplied documents in their given order (strings get ids "0", "1", ...)."""
    docs = [d if isinstance(d, Document) else Document(id=str(i), text=d) for i, d in enumerate(documents)]
    pool = [Candidate(doc_id=d.id, score=0.0, rank=i + 1, document=d) for i, d in enumerate(docs)]
    return Ranking(query=as_query(query), candidates=pool)


def progress_options(total: int) -> dict[str, Any]:
    """tqdm options for a run over ``total`` queries: a live bar on a terminal; written to a log
    (long LLM runs), a line every 30 s for runs of 50 or more instead of a redraw per step."""
    if sys.stderr.isatty():
        return {"disable": None}
    return {"disable": total < 50, "mininterval": 30.0}


class Pipeline:
    """Ordered stages over one corpus.

    >>> p = load_pipeline("configs/hybrid.toml")
    >>> p.search("does vitamin D prevent fractures", k=10).candidates[0].document.title
    """

    def __init__(
        self,
        name: str,
        stages: Sequence[BaseStage],
        context: PipelineContext,
        *,
        source: Path | None = None,
        description: str = "",
        indexes: Sequence[BaseStage] = (),
    ) -> None:
        self.name = name
        self.stages = list(stages)
        self.indexes = list(indexes)
        """Stages kept current with the corpus that no query runs (the file's ``[[indexes]]``)."""
        self.context = context
        self.source = source
        self.description = description
        self.quarantined: dict[str, str] = {}
        """Documents an index refused at ``recover`` (id -> reason): in the store, not in that index."""

    # ---- querying -------------------------------------------------------------------------
    def search(self, query: QueryLike, k: int = 10, *, user_history: Sequence[str] = ()) -> Ranking:
        """Rank the corpus for one query; returns the best ``k`` with documents attached."""
        return self.search_batch([as_query(query, 0, user_history)], k=k)[0]

    def search_batch(self, queries: Sequence[QueryLike], k: int = 10) -> list[Ranking]:
        """Rank the corpus for several queries at once (stages batch their model calls)."""
        batch = [Ranking(query=as_query(q, i)) for i, q in enumerate(queries)]
        return self.run(batch, k=k)

    def rerank(self, query: QueryLike, documents: Sequence[Document | str], k: int | None = None) -> Ranking:
        """Rank supplied documents only (no index needed): every stage scores exactly these."""
        return self.run([candidate_pool(query, documents)], k=k)[0]

    def run(
        self,
        rankings: Sequence[Ranking],
        *,
        k: int | None = None,
        deadline: float | None = None,
        on_stage: Callable[[str, list[Ranking]], None] | None = None,
        stages: slice | None = None,
    ) -> list[Ranking]:
        """Run every stage (``stages``: a slice of them) over the batch, timing each.

        Rankings that arrive with candidates are scored as given (retrievers rescore the supplied
        pool instead of searching the index). With a ``deadline`` (``time.monotonic()`` value),
        stages that would start after it are skipped and the rankings are marked degraded.
        ``on_stage(stage_name, rankings)`` is called after each stage (the service keeps the latest
        as a fallback when a later stage overruns a deadline).
        """
        current = list(rankings)
        last = self.stages[-1] if self.stages else None
        for stage in self.stages[stages or slice(None)]:
            if deadline is not None and time.monotonic() >= deadline and any(r.candidates for r in current):
                for r in current:
                    r.degraded = True
                    r.notes.append(f"deadline reached before stage {stage.name!r}; earlier ranking returned")
                break
            started = time.perf_counter()
            if stage is last and k is not None and isinstance(stage, BaseStage):
                current = stage.run_top(current, k)  # a search only as deep as the answer
            else:
                current = stage.run(current)
            elapsed_ms = (time.perf_counter() - started) * 1000.0
            for r in current:
                r.timings_ms[stage.name] = r.timings_ms.get(stage.name, 0.0) + elapsed_ms
            if on_stage is not None:
                on_stage(stage.name, current)
        if k is not None:
            current = [r.top_k(k) for r in current]
        if k is not None and self.context.index_dir is not None:
            # Only short result lists carry text: an eval run over depth 1000 does not need it.
            self.context.attach_documents(current, limit=k)
        return [replace(r) for r in current]

    def run_batched(
        self, rankings: Sequence[Ranking], batch_size: int = 32, desc: str | None = None
    ) -> list[Ranking]:
        """``run`` (full depth) over many rankings, ``batch_size`` at a time, with a progress bar."""
        from tqdm import tqdm

        out: list[Ranking] = []
        with tqdm(
            total=len(rankings), unit="q", desc=desc or self.name, **progress_options(len(rankings))
        ) as bar:
            for start in range(0, len(rankings), batch_size):
                out.extend(self.run(rankings[start : start + batch_size]))
                bar.update(min(batch_size, len(rankings) - start))
        return out

    def from_stage(self, name: str) -> Pipeline:
        """This pipeline from its top-level stage ``name`` on (same context and indexes): what reranks a
        supplied candidate list (a reranking-form dataset's BM25 top-100) without the stages before it."""
        names = [stage.name for stage in self.stages]
        if name not in names:
            raise ConfigError(f"pipeline {self.name!r} has no top-level stage {name!r} (stages: {', '.join(names)})")
        start = names.index(name)
        return Pipeline(
            f"{self.name}-from-{name}" if start else self.name,
            self.stages[start:],
            self.context,
            source=self.source,
            description=self.description,
            indexes=self.indexes,
        )

    # ---- indexing -------------------------------------------------------------------------
    def iter_stages(self) -> Iterator[BaseStage]:
        """Every stage once, the ``indexes`` and nested ones included (fusion's retrievers), each after its
        dependencies (the dense index a PPR graph is built from)."""
        seen: set[int] = set()

        def walk(stages: Iterable[BaseStage]) -> Iterator[BaseStage]:
            for stage in stages:
                if id(stage) in seen:
                    continue
                seen.add(id(stage))
                yield from walk(stage.dependencies())
                yield stage
                yield from walk(stage.children)

        return walk([*self.indexes, *self.stages])

    def index(self, documents: Iterable[Document] | None = None, *, rebuild: bool = False) -> None:
        """Load the corpus into the store (once) and build every stage's index.

        ``documents`` defaults to the corpus the pipeline names. Stages whose index already
        exists and matches are left alone; one that does not match raises unless ``rebuild``.
        """
        store = self.context.store
        if rebuild or len(store) == 0:
            if documents is None:
                documents = self.corpus_documents()
            store.upsert(documents)
        for stage in self.iter_stages():
            stage.build(store, rebuild=rebuild)

    def corpus_documents(self) -> Iterator[Document]:
        from streamrank.datasets import load_dataset

        if self.context.corpus is None:
            raise InvalidQueryError("this pipeline names no corpus to index")
        return load_dataset(self.context.corpus).corpus()

    def add_documents(self, documents: Sequence[Document], *, group: Sequence[Pipeline] = ()) -> None:
        """Upsert documents: durable in the store first, then added to every index (this pipeline's
        and those of ``group``, other pipelines over the same index folder).

        All or nothing: when an index refuses them (:class:`DocumentsRefused`) or a disk fails
        (:class:`~streamrank.store.StorageError`), the store and every index that took them are put
        back as they were before the error is raised.
        """
        documents = list({d.id: d for d in documents}.values())
        if not documents:
            return
        store = self.context.store
        self._write_everywhere(
            [d.id for d in documents], lambda: store.upsert(documents), lambda stage: stage.add(documents), group
        )

    def delete_documents(self, doc_ids: Sequence[str], *, group: Sequence[Pipeline] = ()) -> None:
        """Remove documents: from the store first (the source of truth ``recover`` trusts), then from
        every index (also ``group``'s). All or nothing, like ``add_documents``."""
        ids = list(dict.fromkeys(doc_ids))
        if not ids:
            return
        store = self.context.store
        self._write_everywhere(ids, lambda: store.delete(ids), lambda stage: stage.delete(ids), group)

    def _write_everywhere(
        self,
        ids: list[str],
        write_store: Callable[[], Any],
        write_stage: Callable[[BaseStage], Any],
        group: Sequence[Pipeline],
    ) -> None:
        """The store first, then every index of this pipeline and ``group``; on an error all of it undone."""
        previous = self.context.store.get_many(ids)
        _write_or_raise("the document store", write_store)
        done: list[BaseStage] = []
        for stage in self._write_stages(group):
            try:
                write_stage(stage)
            except Exception as exc:
                self._undo_write(ids, previous, [*done, stage])
                error = _write_error(stage, ids, exc)
                if error is None:
                    raise
                raise error from exc
            done.append(stage)
        for member in (self, *group):
            for doc_id in ids:
                member.quarantined.pop(doc_id, None)

    def _write_stages(self, group: Sequence[Pipeline]) -> list[BaseStage]:
        seen: set[int] = set()
        stages: list[BaseStage] = []
        for member in (self, *group):
            for stage in member.iter_stages():
                if id(stage) not in seen:
                    seen.add(id(stage))
                    stages.append(stage)
        return stages

    def _undo_write(self, ids: Sequence[str], previous: dict[str, Document], stages: Sequence[BaseStage]) -> None:
        """Put ``ids`` back to ``previous`` in the store and in ``stages`` (best effort: what cannot be
        undone is logged, and the next ``recover`` repairs the indexes from the store)."""
        try:
            self.context.store.restore(ids, previous)
        except Exception as exc:
            log.error("undoing a failed write: the document store could not be restored: %s", short_message(exc))
        new = [doc_id for doc_id in ids if doc_id not in previous]
        for stage in stages:
            try:
                stage.delete(new)
                stage.add(list(previous.values()))
            except Exception as exc:
                log.error("undoing a failed write: index %r could not be restored: %s", stage.name, short_message(exc))

    def recover(self) -> dict[str, int]:
        """Make every index agree with the store after a crash; returns repaired counts per stage.

        The store is the source of truth (a write is durable there before any index sees it).
        Stages whose ``indexed_ids()`` lists their documents get the stored documents they lack
        re-added and ids the store no longer holds deleted; other stages (None) are left alone.
        A document an index refuses is quarantined, not fatal: it stays in the store, is listed in
        ``quarantined`` (id -> reason) and logged, and the others are re-added. A disk that cannot
        be written raises StorageError.
        """
        store = self.context.store
        stored = store.ids()
        repaired: dict[str, int] = {}
        self.quarantined = {}
        for stage in self.iter_stages():
            indexed = stage.indexed_ids()
            if indexed is None:
                continue
            have = set(indexed)
            missing = [doc_id for doc_id in stored if doc_id not in have]
            extra = sorted(have.difference(stored))
            added = 0
            if missing:
                found = store.get_many(missing)
                added = self._add_or_quarantine(stage, [found[doc_id] for doc_id in missing if doc_id in found])
            if extra:
                _write_or_raise(f"the {stage.name!r} index", lambda: stage.delete(extra))  # noqa: B023
            if added or extra:
                repaired[stage.name] = added + len(extra)
        return repaired

    def _add_or_quarantine(self, stage: BaseStage, documents: list[Document]) -> int:
        """Add ``documents`` to ``stage``; halve a refused batch until the refused documents are
        alone, and quarantine those. Returns how many were added."""
        if not documents:
            return 0
        try:
            stage.add(documents)
            return len(documents)
        except Exception as exc:
            error = _write_error(stage, [d.id for d in documents], exc)
            if not isinstance(error, DocumentsRefused):
                if error is None:
                    raise
                raise error from exc
            if len(documents) > 1:
                half = len(documents) // 2
                return self._add_or_quarantine(stage, documents[:half]) + self._add_or_quarantine(
                    stage, documents[half:]
                )
            doc_id = documents[0].id
            self.quarantined[doc_id] = f"index {stage.name!r} refused it: {error.reason}"
            log.error(
                "pipeline %r: index %r refused document %s at recovery; quarantined (kept in the store, "
                "not in that index; delete it or replace it): %s", self.name, stage.name, show_id(doc_id), error.reason,
            )
            return 0

    def close(self) -> None:
        for stage in self.iter_stages():
            stage.close()
        self.context.close()

    def __repr__(self) -> str:
        return f"Pipeline({self.name!r}, stages={[s.name for s in self.stages]})"


# ---- write errors ----------------------------------------------------------------------------
class DocumentsRefused(StreamRankError):
    """An index refused documents (Lucene's limit on an id term, say); nothing of the write was kept."""

    def __init__(self, stage: str, doc_ids: Sequence[str], reason: str) -> None:
        what = f"document {show_id(doc_ids[0])}" if len(doc_ids) == 1 else f"a write of {len(doc_ids)} documents"
        super().__init__(f"the {stage!r} index refused {what}: {reason}; nothing was written")
        self.stage = stage
        self.doc_ids = list(doc_ids)
        self.reason = reason


def show_id(doc_id: str, limit: int = 60) -> str:
    """A document id for a message: quoted, shortened when long (with its length in bytes)."""
    if len(doc_id) <= limit:
        return repr(doc_id)
    return f"{doc_id[:limit]!r}... ({len(doc_id.encode('utf-8', 'surrogatepass'))} bytes)"


_PROBLEM_TEXT = {"full": "the disk is full", "read_only": "it is read-only", "io": "an I/O error"}


def _write_or_raise(where: str, write: Callable[[], object]) -> None:
    """Run ``write``; a disk problem becomes StorageError naming ``where`` and the reason."""
    try:
        write()
    except Exception as exc:
        problem = storage_problem(exc)
        if problem is None:
            raise
        raise StorageError(f"{where} cannot be written ({_PROBLEM_TEXT[problem]}): {short_message(exc)}", problem, where) from exc


def _write_error(stage: BaseStage, doc_ids: Sequence[str], exc: BaseException) -> StreamRankError | None:
    """What a failed index write means: StorageError (disk), DocumentsRefused (the index rejects the
    documents: a ValueError, or Java's IllegalArgumentException), or None (a bug: re-raise as is)."""
    problem = storage_problem(exc)
    if problem is not None:
        where = f"the {stage.name!r} index"
        return StorageError(f"{where} cannot be written ({_PROBLEM_TEXT[problem]}): {short_message(exc)}", problem, where)
    if isinstance(exc, ValueError) or getattr(exc, "classname", None) == "java.lang.IllegalArgumentException":
        return DocumentsRefused(stage.name, doc_ids, short_message(exc))
    return None
