"""The ``sharded`` stage: one retriever's index split into N shards by document id, searched by
scatter-gather.

A pipeline with ``shards = N`` builds every retriever with an index (BM25, dense, SPLADE) as this
stage, under the retriever's own name; ``kind = "sharded"`` with ``shards`` and a ``retriever`` table
shards one stage alone::

    [[stages]]
    kind = "sharded"
    shards = 4
    retriever = {kind = "dense", k = 100}

- **Placement**: document ``d`` lives in shard ``shard_of(d.id, N)`` (:mod:`streamrank.index.sharded`);
  shard ``i``'s index is ``<index_dir>/shards-<N>/<i>/<index>``. The document store stays one.
- **Search**: queries are prepared once (dense: encoded once, by this stage), every shard returns
  its best ``k``, and the lists are merged (ties by doc id). Exact indexes (dense ``flat``) give the
  unsharded index's top ``k`` and scores; BM25 scores use each shard's own document statistics
  (N, document frequencies, average length), see BENCHMARKS.md for what that changes.
- **Supplied pools** are split by owner shard and each part scored there.
- **Writes** go to the owning shard only (a replaced id is replaced where it lives); dense vectors
  of new documents are encoded once here and handed to the shard. ``indexed_ids`` is the union.
- **Where shards run**: in process by default; a front end hands the stage another group with
  :meth:`ShardedRetriever.serve_shards` (the Ray Serve shard deployments).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

from pydantic import Field

from streamrank.errors import ConfigError
from streamrank.index.base import run_retriever, select_prepared
from streamrank.index.shard_worker import (
    LocalShardGroup,
    ShardContext,
    ShardGroup,
    ShardSpec,
    shard_root,
    stage_key,
)
from streamrank.index.sharded import merge_top_k, shard_of, split_by_shard
from streamrank.stage import BaseStage, StageConfig
from streamrank.types import Document, Ranking


class ShardedConfig(StageConfig):
    shards: int = Field(ge=1)
    retriever: dict[str, Any]
    """The TOML table of the retriever to shard (its ``k`` is the search depth)."""


class ShardedRetriever(BaseStage):
    """A retriever over ``shards`` disjoint parts of the corpus (see the module docstring)."""

    Config = ShardedConfig
    config: ShardedConfig

    def __init__(self, config: ShardedConfig, context: Any) -> None:
        super().__init__(config, context)
        where = f"sharded stage {self.name!r}"
        inner_cls, inner = context.validate_stage(config.retriever, f"{where}: retriever")
        if not inner_cls.shardable:
            raise ConfigError(f"{where}: a {inner.kind!r} stage keeps no index to shard")
        if getattr(inner, "history_weight", 0):
            raise ConfigError(f"{where}: history_weight needs every stored vector; it is not supported with shards")
        self.n = config.shards
        self.depth = inner.k
        self.options = dict(config.retriever)
        self.template: Any = inner_cls(inner, ShardContext(context, None, self.n))
        """The retriever without an index: prepares queries (dense: encodes them) once for every shard."""
        self._group: ShardGroup | None = None
        self._supplied: Mapping[str, Any] | None = None

    @property
    def spec(self) -> ShardSpec:
        """What a group serving this stage's shards needs (the same key in every process)."""
        return ShardSpec(key=stage_key(self.options, self.n), options=self.options, shards=self.n, context=self.context)

    @property
    def group(self) -> ShardGroup:
        """The shards: the group handed to :meth:`serve_shards`, else every shard in this process (made on first use)."""
        if self._group is None:
            self._group = LocalShardGroup(self.spec)
        return self._group

    def serve_shards(self, group: ShardGroup) -> None:
        """Scatter to ``group`` from now on (shards served elsewhere); the previous group is closed."""
        if self._group is not None:
            self._group.close()
        self._group = group

    @property
    def encodes_documents(self) -> bool:
        """Whether the retriever embeds documents (dense): then this stage encodes them for the shards."""
        return hasattr(self.template, "supply_embeddings")

    # ---- searching ----------------------------------------------------------------------------
    def run(self, rankings: Sequence[Ranking]) -> list[Ranking]:
        return self._run(rankings, self.depth)

    def run_top(self, rankings: Sequence[Ranking], k: int) -> list[Ranking]:
        return self._run(rankings, max(1, min(k, self.depth)))

    def _run(self, rankings: Sequence[Ranking], depth: int) -> list[Ranking]:
        return run_retriever(self, rankings, depth, self.depth)

    # ---- the retriever protocol, over the shards ------------------------------------------------
    def prepare(self, rankings: Sequence[Ranking]) -> Any:
        """The retriever's own preparation, once for every shard (dense: the query vectors)."""
        return self.template.prepare(rankings)

    def search(self, rankings: Sequence[Ranking], prepared: Any, k: int) -> list[list[tuple[str, float]]]:
        """Scatter the queries to every shard, gather each shard's best ``k`` and merge them."""
        queries = [Ranking(query=r.query) for r in rankings]
        per_shard = self.group.call("search", {s: (queries, prepared, k) for s in range(self.n)})
        return [merge_top_k([per_shard[s][q] for s in range(self.n)], k) for q in range(len(queries))]

    def score_pool(self, rankings: Sequence[Ranking], prepared: Any) -> list[list[float]]:
        return self._score_pools(rankings, prepared)

    def _score_pools(self, rankings: Sequence[Ranking], prepared: Any) -> list[list[float]]:
        """Each supplied candidate scored by its owning shard; scores back in the pool's order."""
        parts: dict[int, list[tuple[int, Ranking]]] = {}
        for n, ranking in enumerate(rankings):
            for shard, cands in split_by_shard(ranking.candidates, self.n, key=lambda c: c.doc_id).items():
                parts.setdefault(shard, []).append((n, Ranking(query=ranking.query, candidates=cands)))
        args = {
            shard: ([sub for _, sub in items], select_prepared(prepared, [n for n, _ in items]))
            for shard, items in parts.items()
        }
        replies = self.group.call("score_pool", args)
        by_id: list[dict[str, float]] = [{} for _ in rankings]
        for shard, items in parts.items():
            scores, notes = replies[shard]
            for (n, sub), sub_scores, sub_notes in zip(items, scores, notes, strict=True):
                by_id[n].update({c.doc_id: s for c, s in zip(sub.candidates, sub_scores, strict=True)})
                rankings[n].notes.extend(note for note in sub_notes if note not in rankings[n].notes)
        return [[found[c.doc_id] for c in r.candidates] for r, found in zip(rankings, by_id, strict=True)]

    # ---- index lifecycle ----------------------------------------------------------------------
    def build(self, documents: Iterable[Document], *, rebuild: bool = False) -> None:
        """Build every shard's index over its documents of the store (``documents`` is the store).

        A dense retriever's vectors are computed here once (supplied ones, a sibling index's stored
        ones, or encoded) for the shards that need building, so sharding never changes a vector.
        """
        store = self.context.store
        need = list(range(self.n))
        if not rebuild:
            present = self.group.call("has_index", {s: () for s in need})
            need = [s for s in need if not present[s]]
        vectors: dict[int, dict[str, Any] | None] = {s: None for s in range(self.n)}
        if need and self.encodes_documents:
            docs = [d for d in store if shard_of(d.id, self.n) in need]
            found = self._corpus_vectors(store, docs)
            for doc in docs:
                shard = shard_of(doc.id, self.n)
                vectors[shard] = vectors[shard] or {}
                vectors[shard][doc.id] = found[doc.id]  # type: ignore[index]
        self.group.call("build", {s: (rebuild, vectors[s]) for s in range(self.n)})

    def _corpus_vectors(self, store: Any, docs: list[Document]) -> dict[str, Any]:
        from streamrank.index.dense import REUSE_KEYS
        from streamrank.index.faiss_index import sibling_embeddings

        if self._supplied is not None and all(d.id in self._supplied for d in docs):
            return {d.id: self._supplied[d.id] for d in docs}
        settings = self.template.settings()
        wanted = {k: settings.get(k) for k in REUSE_KEYS}
        index_dir = self.context.require_index_dir(f"the {self.name!r} stage")
        reused = sibling_embeddings(index_dir / f".sharded-{self.name}", wanted, store.checksum(), store.ids())
        if reused is not None:
            rows = {doc_id: row for row, doc_id in enumerate(store.ids())}
            return {d.id: reused[1][rows[d.id]] for d in docs}
        checkpoint = shard_root(index_dir, self.n) / f".{self.options.get('index') or self.options['kind']}.encoding"
        encoded = self.template.encode_documents(docs, checkpoint=checkpoint)
        return {d.id: row for d, row in zip(docs, encoded, strict=True)}

    @contextmanager
    def supply_embeddings(self, vectors: Mapping[str, Any]) -> Iterator[None]:
        """Inside the block, builds take these vectors (doc id -> embedding) instead of encoding."""
        self._supplied = vectors
        try:
            yield
        finally:
            self._supplied = None

    def add(self, documents: Sequence[Document]) -> None:
        """Add or replace ``documents``, each in its owning shard (dense vectors encoded here, once)."""
        documents = list({d.id: d for d in documents}.values())
        if not documents:
            return
        vectors = None
        if self.encodes_documents:
            encoded = self.template.encode_documents(documents)
            vectors = {d.id: row for d, row in zip(documents, encoded, strict=True)}
        groups = split_by_shard(documents, self.n, key=lambda d: d.id)
        self.group.call(
            "add", {s: (docs, {d.id: vectors[d.id] for d in docs} if vectors else None) for s, docs in groups.items()}
        )

    def delete(self, doc_ids: Sequence[str]) -> None:
        groups = split_by_shard(dict.fromkeys(doc_ids), self.n, key=lambda i: i)
        if groups:
            self.group.call("delete", {s: (ids,) for s, ids in groups.items()})

    def indexed_ids(self) -> list[str]:
        per_shard = self.group.call("indexed_ids", {s: () for s in range(self.n)})
        return [doc_id for s in range(self.n) for doc_id in per_shard[s]]

    def close(self) -> None:
        if self._group is not None:
            self._group.close()
            self._group = None
        self.template.close()
