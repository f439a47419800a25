"""What stages of one pipeline share: the corpus store, the index folder, loaded models, and the
factory that builds the stage tables a stage holds (fusion's retrievers). Core knows no stage kind:
the factory is given by the composition root (:mod:`streamrank.compose`)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any, Protocol, TypeVar

from streamrank.errors import ConfigError, IndexMissingError
from streamrank.store import DocumentStore
from streamrank.types import Ranking

T = TypeVar("T")


class StageFactory(Protocol):
    """Builds and validates stage tables (``{"kind": "bm25", ...}``); given by the composition root."""

    def build(self, options: dict[str, Any], context: PipelineContext, where: str) -> Any:
        """The stage (a ``BaseStage``) for one table, built in ``context``."""
        ...

    def validate(self, options: dict[str, Any], where: str) -> tuple[type, Any]:
        """The stage class and validated config for one table; nothing is built."""
        ...


class PipelineContext:
    """Shared resources, created lazily so that a pipeline that never touches a model never loads it.

    ``index_dir`` is the folder of one corpus: ``docs.sqlite`` plus one sub-folder per index
    (``bm25/``, ``dense/``...). It is None for pipelines that only rerank supplied candidates.
    """

    def __init__(
        self,
        index_dir: Path | None,
        *,
        corpus: str | None = None,
        device: str | None = None,
        shards: int = 1,
        factory: StageFactory | None = None,
    ) -> None:
        self.index_dir = Path(index_dir) if index_dir is not None else None
        self.corpus = corpus
        self.device = device
        self.shards = shards
        """The pipeline's ``shards``: shardable stages are built sharded when it is above 1."""
        self.factory = factory
        """Builds nested stage tables; set by :mod:`streamrank.compose` when it builds a stage here."""
        self._cache: dict[Any, Any] = {}
        self._lock = threading.RLock()

    def require_index_dir(self, what: str) -> Path:
        if self.index_dir is None:
            raise IndexMissingError(
                f"{what} needs an index, but this pipeline has no corpus: set `corpus = ...` in the "
                "pipeline file or pass --corpus/--dataset"
            )
        return self.index_dir

    @cached_property
    def store(self) -> DocumentStore:
        return DocumentStore(self.require_index_dir("the document store") / "docs.sqlite")

    def share_models(self, other: PipelineContext) -> None:
        """Use ``other``'s loaded models (and its lock) from now on: the contexts of a pipeline's shards
        load each model once per process."""
        self._cache, self._lock = other._cache, other._lock

    def shared(self, key: Any, factory: Callable[[], T]) -> T:
        """One object per key for the whole pipeline (models, tokenizers), built on first use."""
        with self._lock:
            if key not in self._cache:
                self._cache[key] = factory()
            return self._cache[key]

    def get(self, key: Any) -> Any | None:
        """The shared object under ``key`` if some stage created it, else None (never creates one)."""
        with self._lock:
            return self._cache.get(key)

    def sentence_encoder(self, model: str, dtype: str = "float32"):
        """A sentence-transformers model shared by every stage that names the same model and dtype."""
        from streamrank.models import load_sentence_encoder

        key = ("sentence-encoder", model) if dtype == "float32" else ("sentence-encoder", model, dtype)
        return self.shared(key, lambda: load_sentence_encoder(model, self.device, dtype))

    def attach_documents(self, rankings: Sequence[Ranking], limit: int | None = None) -> None:
        """Fill ``candidate.document`` from the store where a stage left it empty."""
        missing = [c.doc_id for r in rankings for c in r.candidates[:limit] if c.document is None]
        if not missing:
            return
        found = self.store.get_many(missing)
        for ranking in rankings:
            for cand in ranking.candidates[:limit]:
                if cand.document is None:
                    cand.document = found.get(cand.doc_id)

    def require_documents(self, rankings: Sequence[Ranking], depth: int, stage: str) -> None:
        """Make sure each ranking's top ``depth`` candidates carry text, or raise RankerError naming them."""
        from streamrank.errors import RankerError

        if self.index_dir is not None:
            self.attach_documents(rankings, limit=depth)
        for ranking in rankings:
            missing = [c.doc_id for c in ranking.candidates[:depth] if c.document is None]
            if missing:
                raise RankerError(
                    f"{stage}: no text for candidates {missing[:5]} of query {ranking.query.id!r}: supply "
                    "documents or give the pipeline a corpus whose store holds them"
                )

    def build_stage(self, options: dict[str, Any], where: str) -> Any:
        """The stage (a ``BaseStage``) for a stage table a stage holds (fusion's retrievers)."""
        return self._require_factory(where).build(options, self, where)

    def validate_stage(self, options: dict[str, Any], where: str) -> tuple[type, Any]:
        """The class and validated config of a stage table a stage holds; nothing is built."""
        return self._require_factory(where).validate(options, where)

    def _require_factory(self, where: str) -> StageFactory:
        if self.factory is None:
            raise ConfigError(f"{where}: this context has no stage factory (build stages with streamrank.compose)")
        return self.factory

    def close(self) -> None:
        for obj in self._cache.values():
            close = getattr(obj, "close", None)
            if callable(close):
                close()
        if "store" in self.__dict__:
            self.store.close()
