"""One shard of a sharded retriever, and the groups of shards a sharded stage scatters to.

A :class:`ShardWorker` holds the index stage (BM25, dense...) of one shard: its own folder
``<index_dir>/shards-<N>/<i>/<index>``, its part of the corpus (a :class:`~streamrank.index.sharded.ShardStore`
view of the pipeline's store) and the calls a sharded stage makes: ``search``, ``score_pool``,
``add``, ``delete``, ``indexed_ids``, ``build``, ``recover``. Arguments and results are plain
records (rankings, arrays, documents), so the same worker runs in process (:class:`LocalShardGroup`)
or inside an actor of a cluster front end.

Shards run in process (:class:`LocalShardGroup`) unless a front end hands a sharded stage another
group explicitly (``ShardedRetriever.serve_shards``: the Serve deployments of
``streamrank.service.ray_shards``); there is no process-wide switch.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Protocol

from streamrank.context import PipelineContext
from streamrank.index.sharded import ShardStore
from streamrank.types import Document, Ranking


def shard_root(index_dir: Path, shards: int) -> Path:
    """The folder holding the shards of an ``shards``-way split of ``index_dir``."""
    return index_dir / f"shards-{shards}"


class ShardContext(PipelineContext):
    """The context of one shard's stage: its own index folder, the shard's view of the store, and the
    parent's shared models (one encoder per process however many shards it serves).

    ``shard=None`` is the coordinator's context: no index folder, models only (query encoding).
    """

    def __init__(self, parent: PipelineContext, shard: int | None, shards: int) -> None:
        folder = None
        if shard is not None:
            folder = shard_root(parent.require_index_dir("a sharded index"), shards) / str(shard)
        super().__init__(folder, corpus=parent.corpus, device=parent.device, factory=parent.factory)
        self.parent, self.shard, self.shard_count = parent, shard, shards  # self.shards stays 1: no nesting
        self.share_models(parent)  # one encoder per process, however many shards

    @cached_property
    def store(self) -> ShardStore:  # type: ignore[override]
        assert self.shard is not None, "the coordinator's context has no store view"
        return ShardStore(self.parent.store, self.shard, self.shard_count)

    def close(self) -> None:
        """Nothing to release: the parent closes the shared models and the store."""


@dataclass(frozen=True)
class ShardSpec:
    """What a backend needs to serve the shards of one sharded stage."""

    key: str
    """Identifies the stage across processes: its name and options."""
    options: dict[str, Any]
    """The inner stage's TOML table (``kind = "bm25"``...)."""
    shards: int
    context: PipelineContext = field(compare=False)


class ShardGroup(Protocol):
    """The shards of one sharded stage: ``call`` runs one worker method on several shards at once."""

    shards: int

    def call(self, method: str, args: dict[int, tuple[Any, ...]]) -> dict[int, Any]:
        """``ShardWorker.<method>(*args[i])`` on each shard ``i`` in ``args``; results by shard."""
        ...

    def close(self) -> None: ...


class ShardWorker:
    """One shard's index stage and the calls a sharded stage makes on it."""

    def __init__(self, options: dict[str, Any], parent: PipelineContext, shard: int, shards: int) -> None:
        self.shard, self.shards = shard, shards
        self.context = ShardContext(parent, shard, shards)
        self.stage: Any = self.context.build_stage(dict(options), f"shard {shard} of {shards}")
        self._writes = threading.Lock()

    # ---- reading ------------------------------------------------------------------------------
    def search(self, rankings: Sequence[Ranking], prepared: Any, depth: int) -> list[list[tuple[str, float]]]:
        """The shard's best ``depth`` (doc id, score) per query; ``prepared`` is the coordinator's
        ``prepare`` output for these rankings (dense: the query vectors, encoded once for all shards)."""
        return self.stage.search(list(rankings), prepared, depth)

    def score_pool(self, rankings: Sequence[Ranking], prepared: Any) -> tuple[list[list[float]], list[list[str]]]:
        """Scores of the supplied candidates (all owned by this shard) and the notes the stage added."""
        rankings = [Ranking(query=r.query, candidates=list(r.candidates)) for r in rankings]
        scores = self.stage.score_pool(rankings, prepared)
        return scores, [r.notes for r in rankings]

    def indexed_ids(self) -> list[str]:
        return self.stage.indexed_ids()

    def has_index(self) -> bool:
        from streamrank.index import manifest as mf

        return mf.read_manifest(self.stage.folder) is not None

    # ---- writing ------------------------------------------------------------------------------
    def build(self, rebuild: bool, embeddings: dict[str, Any] | None = None) -> None:
        """Build the shard's index over its part of the store (``embeddings``: dense vectors by id)."""
        with self._writes, self._supplied(embeddings):
            self.stage.build(self.context.store, rebuild=rebuild)

    def add(self, documents: Sequence[Document], embeddings: dict[str, Any] | None = None) -> None:
        with self._writes, self._supplied(embeddings):
            self.stage.add(list(documents))

    def delete(self, doc_ids: Sequence[str]) -> None:
        with self._writes:
            self.stage.delete(list(doc_ids))

    def recover(self) -> int:
        """Make the shard's index hold exactly the store's documents of this shard; returns the repairs.

        Run when a shard's server (re)starts: every acknowledged write is in the store, so a shard
        that died between the store and its index is repaired from there.
        """
        if not self.has_index():
            return 0
        with self._writes:
            view = self.context.store
            stored = view.ids()
            have = set(self.stage.indexed_ids())
            missing = [doc_id for doc_id in stored if doc_id not in have]
            extra = sorted(have.difference(stored))
            if missing:
                found = view.get_many(missing)
                self.stage.add([found[i] for i in missing if i in found])
            if extra:
                self.stage.delete(extra)
            return len(missing) + len(extra)

    def _supplied(self, embeddings: dict[str, Any] | None):
        """Hand precomputed dense vectors to the stage for one write (no re-encoding in the shard)."""
        import contextlib

        supply = getattr(self.stage, "supply_embeddings", None)
        if embeddings is None or supply is None:
            return contextlib.nullcontext()
        return supply(embeddings)

    def close(self) -> None:
        self.stage.close()


class LocalShardGroup:
    """Every shard of a stage in this process (searched one after another)."""

    def __init__(self, spec: ShardSpec) -> None:
        self.shards = spec.shards
        self.workers = [ShardWorker(spec.options, spec.context, i, spec.shards) for i in range(spec.shards)]

    def call(self, method: str, args: dict[int, tuple[Any, ...]]) -> dict[int, Any]:
        return {i: getattr(self.workers[i], method)(*a) for i, a in sorted(args.items())}

    def close(self) -> None:
        for worker in self.workers:
            worker.close()


def stage_key(options: dict[str, Any], shards: int) -> str:
    """A name for the sharded stage that is the same in every process (for actor lookups)."""
    import json

    return f"{shards}:" + json.dumps(options, sort_keys=True, default=str)


__all__ = [
    "LocalShardGroup",
    "ShardContext",
    "ShardGroup",
    "ShardSpec",
    "ShardWorker",
    "shard_root",
    "stage_key",
]
