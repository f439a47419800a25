"""A pipeline: stages run in order over a batch of queries. The one object all front ends share."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from streamrank.context import PipelineContext
from streamrank.errors import InvalidQueryError
from streamrank.stage import BaseStage
from streamrank.types import Candidate, Document, Query, Ranking

QueryLike = str | Query


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
    ) -> None:
        self.name = name
        self.stages = list(stages)
        self.context = context
        self.source = source
        self.description = description

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
    ) -> list[Ranking]:
        """Run every stage over the batch, timing each.

        Rankings that arrive with candidates are scored as given (retrievers rescore the supplied
        pool instead of searching the index). With a ``deadline`` (``time.monotonic()`` value),
        stages that would start after it are skipped and the rankings are marked degraded.
        ``on_stage(stage_name, rankings)`` is called after each stage (the service keeps the latest
        as a fallback when a later stage overruns a deadline).
        """
        current = list(rankings)
        last = self.stages[-1] if self.stages else None
        for stage in self.stages:
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

    # ---- indexing -------------------------------------------------------------------------
    def iter_stages(self) -> Iterator[BaseStage]:
        """Every stage once, nested ones included (fusion's retrievers), each after its dependencies
        (the dense index a PPR graph is built from, even when the pipeline has no dense stage)."""
        seen: set[int] = set()

        def walk(stages: Iterable[BaseStage]) -> Iterator[BaseStage]:
            for stage in stages:
                if id(stage) in seen:
                    continue
                seen.add(id(stage))
                yield from walk(stage.dependencies())
                yield stage
                yield from walk(getattr(stage, "children", ()))

        return walk(self.stages)

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
        from streamrank.eval.datasets import load_dataset

        if self.context.corpus is None:
            raise InvalidQueryError("this pipeline names no corpus to index")
        return load_dataset(self.context.corpus).corpus()

    def add_documents(self, documents: Sequence[Document]) -> None:
        """Upsert documents: durable in the store first, then added to every index."""
        self.context.store.upsert(documents)
        for stage in self.iter_stages():
            stage.add(documents)

    def delete_documents(self, doc_ids: Sequence[str]) -> None:
        """Remove documents: from the store first (the source of truth ``recover`` trusts), then indexes."""
        self.context.store.delete(doc_ids)
        for stage in self.iter_stages():
            stage.delete(doc_ids)

    def recover(self) -> dict[str, int]:
        """Make every index agree with the store after a crash; returns repaired counts per stage.

        The store is the source of truth (a write is durable there before any index sees it).
        Stages that implement ``indexed_ids()`` get the stored documents they lack re-added and
        ids the store no longer holds deleted; other stages are left alone.
        """
        store = self.context.store
        stored = store.ids()
        repaired: dict[str, int] = {}
        for stage in self.iter_stages():
            indexed_ids = getattr(stage, "indexed_ids", None)
            if indexed_ids is None:
                continue
            have = set(indexed_ids())
            missing = [doc_id for doc_id in stored if doc_id not in have]
            extra = sorted(have.difference(stored))
            if missing:
                found = store.get_many(missing)
                stage.add([found[doc_id] for doc_id in missing if doc_id in found])
            if extra:
                stage.delete(extra)
            if missing or extra:
                repaired[stage.name] = len(missing) + len(extra)
        return repaired

    def close(self) -> None:
        for stage in self.iter_stages():
            stage.close()
        self.context.close()

    def __repr__(self) -> str:
        return f"Pipeline({self.name!r}, stages={[s.name for s in self.stages]})"
