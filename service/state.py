"""What one running service holds: its pipelines, their runners, readiness, and document writes."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
import unicodedata
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

from streamrank.errors import StreamRankError
from streamrank.pipeline import DocumentsRefused, Pipeline
from streamrank.service.batching import (
    BatchPolicy,
    PipelineRunner,
    ReadWriteLock,
    RunResult,
    ServiceUnavailable,
    warm_up,
)
from streamrank.service.health import WriteHealth
from streamrank.service.metrics import Metrics
from streamrank.service.settings import Settings
from streamrank.store import StorageError, short_message
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
        self.status: Literal["loading", "ready", "error", "stopping"] = "loading"
        self.error: str | None = None
        self.recovered: dict[str, dict[str, int]] = {}
        self.recovery_problems: list[str] = []
        """Why startup recovery could not finish (a disk that cannot be written), per pipeline."""
        self.health = WriteHealth()
        self._writes = 0
        self._writes_changed = threading.Condition()
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
            await asyncio.to_thread(self.load_pipelines)
        except Exception as exc:  # reported by /readyz and every request (one line, no stack trace)
            message = short_message(exc, limit=500)
            self.status = "error"
            self.error = message if getattr(exc, "classname", None) else f"{type(exc).__name__}: {message}"
            log.error("loading pipelines failed: %s", self.error, exc_info=not isinstance(exc, StreamRankError))
            return
        s = self.settings
        policy = BatchPolicy.of(s)  # the Ray back end batches with the same bounds (service/ray_serve.py)
        for name, pipeline in self.pipelines.items():
            for kind in ("search", "rerank"):
                self._runners[(name, kind)] = PipelineRunner(
                    pipeline,
                    max_batch=policy.max_batch,
                    window_s=policy.window_s,
                    workers=policy.workers,
                    lock=self.lock_for(pipeline),
                    observer=self.metrics.batch_observer(name, kind),
                    name=f"{name}-{kind}",
                )
        self.status = "ready"
        self.metrics.ready.set(1)
        self._report_quarantine()
        self.metrics.writable.set(0 if self.health.problems(self.index_folders()) else 1)
        log.info("ready: %s in %.1f s", ", ".join(self.pipelines), time.perf_counter() - started)

    def load_pipelines(self) -> None:
        """Load every configured pipeline (blocking), recover its indexes and warm it up (per the settings)."""
        from streamrank.compose import load_pipeline

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
                try:
                    repaired = pipeline.recover()
                except StorageError as exc:  # serve searches anyway; writes will say why they fail
                    problem = f"pipeline {pipeline.name!r}: startup recovery could not finish: {exc}"
                    self.recovery_problems.append(problem)
                    assert pipeline.context.index_dir is not None
                    self.health.write_failed(pipeline.context.index_dir, str(exc))
                    log.error("%s", problem)
                    repaired = {}
                if repaired:
                    self.recovered[pipeline.name] = repaired
                    log.warning("pipeline %r: recovered documents after an unclean stop: %s", pipeline.name, repaired)
            if s.warmup:
                warm_up(pipeline)

    async def close(self) -> None:
        """Stop: refuse new requests, let running writes finish (up to ``shutdown_timeout_s``),
        then close every runner and pipeline (indexes and the store flushed and closed)."""
        started = time.perf_counter()
        if self._loader is not None and not self._loader.done():
            await asyncio.shield(self._loader)
        if self.status == "ready":
            self.status = "stopping"
        self.metrics.ready.set(0)
        for runner in self._runners.values():
            await runner.close()
        if not await asyncio.to_thread(self._wait_for_writes, self.settings.shutdown_timeout_s):
            log.error("shutdown: %d document writes still running after %.0f s", self._writes, self.settings.shutdown_timeout_s)
        for pipeline in self.pipelines.values():
            pipeline.close()
        log.info("shutdown: pipelines closed in %.2f s", time.perf_counter() - started)

    def _wait_for_writes(self, timeout: float) -> bool:
        with self._writes_changed:
            return self._writes_changed.wait_for(lambda: self._writes == 0, timeout)

    @contextlib.contextmanager
    def _write_slot(self) -> Iterator[None]:
        """Count a document write in flight (shutdown waits for them); 503 once stopping."""
        with self._writes_changed:
            if self.status == "stopping":
                raise ServiceUnavailable("the service is shutting down")
            self._writes += 1
        try:
            yield
        finally:
            with self._writes_changed:
                self._writes -= 1
                self._writes_changed.notify_all()

    # ---- lookups ----------------------------------------------------------------------------
    def require_ready(self) -> None:
        if self.status == "loading":
            raise ServiceUnavailable("the service is starting: pipelines are still loading")
        if self.status == "error":
            raise ServiceUnavailable(f"the service could not load its pipelines: {self.error}")
        if self.status == "stopping":
            raise ServiceUnavailable("the service is shutting down")

    def index_folders(self) -> list[Path]:
        """The index folders of the served pipelines (each once)."""
        folders = [p.context.index_dir for p in self.pipelines.values() if p.context.index_dir is not None]
        return list(dict.fromkeys(folders))

    def readiness(self) -> dict[str, Any]:
        """What /readyz reports once ready: ``ready``, or ``degraded`` (searches are served, but some
        index folder cannot be written, startup recovery did not finish, or documents are quarantined)."""
        self.require_ready()
        problems = self.health.problems(self.index_folders())
        self.metrics.writable.set(0 if problems else 1)
        quarantined = {name: dict(p.quarantined) for name, p in self.pipelines.items() if p.quarantined}
        degraded = bool(problems or quarantined or self.recovery_problems)
        return {
            "status": "degraded" if degraded else "ready",
            "pipelines": list(self.pipelines),
            "recovered": self.recovered,
            "writable": not problems,
            "problems": [*self.recovery_problems, *problems],
            "quarantined": quarantined,
        }

    def _report_quarantine(self) -> None:
        for name, pipeline in self.pipelines.items():
            self.metrics.quarantined.labels(name).set(len(pipeline.quarantined))

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
        """Rank through the pipeline's runner; an answer that comes after ``deadline`` is ``degraded``."""
        result = await self._runners[(pipeline.name, kind)].run(ranking, k=k, deadline=deadline)
        late = result.ranking
        if deadline is not None and not late.degraded and time.monotonic() > deadline:
            note = "the deadline passed before the first stage finished; the full answer came late"
            result = replace(result, ranking=replace(late, degraded=True, notes=[*late.notes, note]))
        if result.ranking.degraded:
            self.metrics.degraded.labels(pipeline.name).inc()
        return result

    # ---- documents (blocking: call in a worker thread) --------------------------------------
    def upsert(self, pipeline: Pipeline, documents: Sequence[Document]) -> None:
        """Durable in the store (fsynced) before any index sees it; then every index of the group.

        All or nothing: an index refusing a document (DocumentsRefused) or a disk that cannot be
        written (StorageError) leaves the store and the indexes as they were.
        """

        def apply(group: list[Pipeline]) -> int:
            pipeline.add_documents(documents, group=group)
            return len(documents)

        self._write(pipeline, "upsert", apply)

    def delete(self, pipeline: Pipeline, doc_id: str) -> str | None:
        """Remove one document everywhere; the id deleted, or None when the store does not hold it."""
        deleted, _ = self.delete_many(pipeline, [doc_id])
        return deleted[0] if deleted else None

    def delete_many(self, pipeline: Pipeline, doc_ids: Sequence[str]) -> tuple[list[str], list[str]]:
        """Remove documents everywhere; returns (deleted ids, ids the store does not hold)."""
        found: dict[str, str | None] = {}

        def apply(group: list[Pipeline]) -> int:
            found.update({doc_id: self._stored_id(pipeline, doc_id) for doc_id in doc_ids})
            deleted = list(dict.fromkeys(i for i in found.values() if i is not None))
            pipeline.delete_documents(deleted, group=group)
            return len(deleted)

        self._write(pipeline, "delete", apply)
        deleted = list(dict.fromkeys(i for i in found.values() if i is not None))
        return deleted, [doc_id for doc_id, stored in found.items() if stored is None]

    def _write(self, pipeline: Pipeline, operation: str, apply: Callable[[list[Pipeline]], int]) -> None:
        """``apply(other pipelines of the group)`` under the group's write lock, counted for shutdown."""
        folder = pipeline.context.index_dir
        with self._write_slot(), self.lock_for(pipeline).write():
            try:
                count = apply(self.group(pipeline)[1:])
            except StorageError as exc:
                self.metrics.write_errors.labels(exc.problem).inc()
                if folder is not None:
                    self.health.write_failed(folder, str(exc))
                self.metrics.writable.set(0)
                raise
            except DocumentsRefused:
                self.metrics.write_errors.labels("refused").inc()
                raise
            finally:
                self._report_quarantine()
        if folder is not None:
            self.health.write_succeeded(folder)
        if count:
            self.metrics.documents_written.labels(operation).inc(count)

    # ---- the same, awaited (what the routes call; the Ray ingress sends them to its writer) -----
    async def ready_report(self) -> dict[str, Any]:
        """:meth:`readiness`, awaited."""
        return await asyncio.to_thread(self.readiness)

    async def upsert_async(self, pipeline: Pipeline, documents: Sequence[Document]) -> None:
        await asyncio.to_thread(self.upsert, pipeline, documents)

    async def delete_async(self, pipeline: Pipeline, doc_id: str) -> str | None:
        return await asyncio.to_thread(self.delete, pipeline, doc_id)

    async def delete_many_async(self, pipeline: Pipeline, doc_ids: Sequence[str]) -> tuple[list[str], list[str]]:
        return await asyncio.to_thread(self.delete_many, pipeline, doc_ids)

    async def get_async(self, pipeline: Pipeline, doc_id: str) -> Document | None:
        return await asyncio.to_thread(self.get, pipeline, doc_id)

    def get(self, pipeline: Pipeline, doc_id: str) -> Document | None:
        """The stored document with this id (or with its NFC form, the form upserts store)."""
        stored = self._stored_id(pipeline, doc_id)
        return None if stored is None else pipeline.context.store.get(stored)

    @staticmethod
    def _stored_id(pipeline: Pipeline, doc_id: str) -> str | None:
        store = pipeline.context.store
        if doc_id in store:
            return doc_id
        normal = unicodedata.normalize("NFC", doc_id)
        return normal if normal != doc_id and normal in store else None
