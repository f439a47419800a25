"""What one running service holds: its pipelines, their runners, readiness, and document writes."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from streamrank.errors import StreamRankError
from streamrank.pipeline import Pipeline
from streamrank.service.batching import PipelineRunner, ReadWriteLock, RunResult, ServiceUnavailable
from streamrank.service.metrics import Metrics
from streamrank.service.settings import Settings
from streamrank.types import Document, Ranking

log = logging.getLogger("streamrank.service")

Kind = Literal["search", "rerank"]
__all__ = ["ServiceState", "ServiceUnavailable", "UnknownPipeline"]


class UnknownPipeline(Exception):
    """A request named a pipeline this service does not serve (HTTP 404)."""


class ServiceState:
    """Loads the configured pipelines in a worker thread, then serves them.

    Pipelines over the same index folder form a group: a document write goes to the store once
    and to every index of the group, under the group's write lock (searches hold it for reading).
    """

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.pipelines: dict[str, Pipeline] = {}
        self.default: str | None = None
        self.status: Literal["loading", "ready", "error"] = "loading"
        self.error: str | None = None
        self.recovered: dict[str, dict[str, int]] = {}
        self._locks: dict[Path | None, ReadWriteLock] = {}
        self._runners: dict[tuple[str, Kind], PipelineRunner] = {}
        self._loader: asyncio.Task[None] | None = None

    # ---- lifecycle --------------------------------------------------------------------------
    async def start(self) -> None:
        """Begin loading in the background; /healthz answers at once, /readyz once loaded."""
        self._loader = asyncio.create_task(self._load())

    async def _load(self) -> None:
        started = time.perf_counter()
        try:
            await asyncio.to_thread(self._load_pipelines)
        except Exception as exc:  # reported by /readyz and every request
            self.status, self.error = "error", f"{type(exc).__name__}: {exc}"
            log.error("loading pipelines failed: %s", self.error, exc_info=not isinstance(exc, StreamRankError))
            return
        s = self.settings
        batch, window = (s.max_batch_size, s.batch_window_ms / 1000.0) if s.batching else (1, 0.0)
        for name, pipeline in self.pipelines.items():
            for kind in ("search", "rerank"):
                self._runners[(name, kind)] = PipelineRunner(
                    pipeline,
                    max_batch=batch,
                    window_s=window,
                    workers=s.workers,
                    lock=self.lock_for(pipeline),
                    observer=self.metrics.batch_observer(name, kind),
                    name=f"{name}-{kind}",
                )
        self.status = "ready"
        self.metrics.ready.set(1)
        log.info("ready: %s in %.1f s", ", ".join(self.pipelines), time.perf_counter() - started)

    def _load_pipelines(self) -> None:
        from streamrank.config import load_pipeline

        s = self.settings
        if s.torch_threads is not None:
            import torch

            torch.set_num_threads(s.torch_threads)
        for ref in s.pipelines:
            pipeline = load_pipeline(ref, corpus=s.corpus, index_dir=s.index_dir)
            if pipeline.name in self.pipelines:
                raise StreamRankError(f"two pipelines are named {pipeline.name!r} ({ref}); give them distinct names")
            self.pipelines[pipeline.name] = pipeline
        self.default = s.default_pipeline or next(iter(self.pipelines))
        if self.default not in self.pipelines:
            raise StreamRankError(f"default_pipeline {self.default!r} is not among {sorted(self.pipelines)}")
        for pipeline in self.pipelines.values():
            has_index = pipeline.context.index_dir is not None
            if s.recover and has_index:
                repaired = pipeline.recover()
                if repaired:
                    self.recovered[pipeline.name] = repaired
                    log.warning("pipeline %r: recovered documents after an unclean stop: %s", pipeline.name, repaired)
            if s.warmup:
                if has_index:
                    pipeline.search("warm up", k=1)
                else:
                    pipeline.rerank("warm up", ["warm up"], k=1)

    async def close(self) -> None:
        if self._loader is not None and not self._loader.done():
            await asyncio.shield(self._loader)
        for runner in self._runners.values():
            await runner.close()
        for pipeline in self.pipelines.values():
            pipeline.close()

    # ---- lookups ----------------------------------------------------------------------------
    def require_ready(self) -> None:
        if self.status == "loading":
            raise ServiceUnavailable("the service is starting: pipelines are still loading")
        if self.status == "error":
            raise ServiceUnavailable(f"the service could not load its pipelines: {self.error}")

    def pipeline(self, name: str | None) -> Pipeline:
        self.require_ready()
        chosen = name or self.default
        if chosen not in self.pipelines:
            raise UnknownPipeline(f"unknown pipeline {chosen!r}; this service serves {sorted(self.pipelines)}")
        return self.pipelines[chosen]

    def lock_for(self, pipeline: Pipeline) -> ReadWriteLock:
        return self._locks.setdefault(pipeline.context.index_dir, ReadWriteLock())

    def group(self, pipeline: Pipeline) -> list[Pipeline]:
        """The loaded pipelines sharing ``pipeline``'s index folder (itself first)."""
        folder = pipeline.context.index_dir
        return [pipeline] + [p for p in self.pipelines.values() if p is not pipeline and p.context.index_dir == folder]

    # ---- ranking ----------------------------------------------------------------------------
    async def run(self, pipeline: Pipeline, kind: Kind, ranking: Ranking, *, k: int | None, deadline: float | None) -> RunResult:
        result = await self._runners[(pipeline.name, kind)].run(ranking, k=k, deadline=deadline)
        if result.ranking.degraded:
            self.metrics.degraded.labels(pipeline.name).inc()
        return result

    # ---- documents (blocking: call in a worker thread) --------------------------------------
    def upsert(self, pipeline: Pipeline, documents: Sequence[Document]) -> None:
        """Durable in the store (fsynced) before any index sees it; then every index of the group."""
        with self.lock_for(pipeline).write():
            for member in self.group(pipeline):
                member.add_documents(documents)
        self.metrics.documents_written.labels("upsert").inc(len(documents))

    def delete(self, pipeline: Pipeline, doc_id: str) -> bool:
        """Remove one document everywhere; False when the store does not hold it."""
        with self.lock_for(pipeline).write():
            if doc_id not in pipeline.context.store:
                return False
            for member in self.group(pipeline):
                member.delete_documents([doc_id])
        self.metrics.documents_written.labels("delete").inc()
        return True

    def get(self, pipeline: Pipeline, doc_id: str) -> Document | None:
        return pipeline.context.store.get(doc_id)
