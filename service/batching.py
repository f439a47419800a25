"""Running pipeline calls for the service: micro-batching, deadlines, and a read/write lock.

Micro-batching (temporal fusion, as in Flover): requests to the same pipeline that arrive within
``window`` of the first one waiting are fused into one ``Pipeline.run`` call of at most
``max_batch`` rankings, so model stages encode and score them together. While ``workers`` batches
are in flight new requests queue up and form the next batch, so under load batches grow without
any extra wait. The first request of a batch never waits longer than the window for company.
Model calls run in worker threads; the event loop only queues and wakes.

Deadlines: each request may carry one (a ``time.monotonic()`` value). The batch runs with the
latest deadline of its members (``Pipeline.run`` skips stages that would start after it) and
reports each finished stage. A request whose own deadline passes while a stage is still running
gets the ranking of the last finished stage (or the supplied order, for reranking), marked
``degraded`` with a note, instead of waiting; the batch goes on for the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from streamrank.pipeline import Pipeline
from streamrank.types import Ranking

if TYPE_CHECKING:
    from streamrank.service.settings import Settings

log = logging.getLogger("streamrank.service")

BatchObserver = Callable[[int, dict[str, float]], None]
"""Called once per executed batch with its size and per-stage wall times (ms)."""


@dataclass(frozen=True)
class BatchPolicy:
    """The service's micro-batching bounds, read from its settings in one place: the in-process
    runner (:class:`PipelineRunner`) and the Ray back end (``serve.batch``) both take them from here."""

    max_batch: int
    window_s: float
    workers: int
    """Batches in flight at once per pipeline and request kind."""

    @classmethod
    def of(cls, settings: Settings) -> BatchPolicy:
        """``batching = false`` is batches of one, sent at once."""
        if settings.batching:
            return cls(settings.max_batch_size, settings.batch_window_ms / 1000.0, settings.workers)
        return cls(1, 0.0, settings.workers)


def _largest(values: Sequence[float | None]) -> float | None:
    """The largest value, or None when any is None (no limit for one means no limit for the batch)."""
    if any(v is None for v in values):
        return None
    return max(v for v in values if v is not None)


Request = tuple[Ranking, int | None, float | None]
"""One request of a batch: its ranking, its own ``k`` and its deadline (a ``time.monotonic()`` value)."""
RunRankings = Callable[[list[Ranking], int | None, float | None, bool], list[Ranking]]
"""``run(rankings, k, deadline, fused)``: the pipeline (or part of it) over ``rankings``."""


def run_fused(run: RunRankings, requests: Sequence[Request]) -> list[Ranking | Exception]:
    """Run a batch as one fused call (the largest ``k``, the latest deadline); if that fails, each request
    alone, so the culprit fails and the others do not. Each request's result is cut to its own ``k``.

    The one batch runner of the service: the in-process :class:`PipelineRunner` and the Ray pipeline
    replicas (``serve.batch``) both call it."""
    k = _largest([r[1] for r in requests])
    try:
        results = run([r[0] for r in requests], None if k is None else int(k), _largest([r[2] for r in requests]), True)
    except Exception as exc:
        if len(requests) == 1:
            return [exc]
        log.warning("a batch of %d failed; running its requests one by one", len(requests), exc_info=True)
        out: list[Ranking | Exception] = []
        for ranking, own_k, deadline in requests:
            try:
                out.append(run([ranking], own_k, deadline, False)[0])
            except Exception as alone:  # returned to this request only
                out.append(alone)
        return out
    return [r.top_k(own_k) if own_k is not None else r for r, (_, own_k, _) in zip(results, requests, strict=True)]


def warm_up(pipeline: Pipeline, stages: slice | None = None) -> None:
    """One tiny request through ``stages`` of the pipeline (all by default), so models are loaded and
    indexes open before traffic comes: a search when the run starts at an indexed first stage, else a rerank."""
    from streamrank.pipeline import as_query, candidate_pool

    if pipeline.context.index_dir is not None and (stages is None or stages.start in (None, 0)):
        pipeline.run([Ranking(query=as_query("warm up"))], k=1, stages=stages)
    else:
        pipeline.run([candidate_pool("warm up", ["warm up"])], k=1, stages=stages)


class ServiceUnavailable(Exception):
    """The service cannot answer now: still loading, failed to load, or shutting down (HTTP 503)."""


class ReadWriteLock:
    """Many readers (searches) or one writer (index updates); a waiting writer goes next."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writing = False
        self._writers_waiting = 0

    @contextlib.contextmanager
    def read(self) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: not self._writing and not self._writers_waiting)
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                self._cond.notify_all()

    @contextlib.contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            self._writers_waiting += 1
            self._cond.wait_for(lambda: not self._writing and self._readers == 0)
            self._writers_waiting -= 1
            self._writing = True
        try:
            yield
        finally:
            with self._cond:
                self._writing = False
                self._cond.notify_all()


class Progress:
    """The rankings after the last finished stage of one batch (written by its worker thread)."""

    def __init__(self, stage_names: Sequence[str], start: list[Ranking] | None) -> None:
        self._names = list(stage_names)
        self._latest: tuple[str | None, list[Ranking] | None] = (None, start)

    def update(self, stage: str, rankings: list[Ranking]) -> None:
        self._latest = (stage, list(rankings))

    def fallback(self, index: int) -> Ranking | None:
        """The ``index``-th ranking so far, marked degraded.

        None when no stage has finished yet, or every stage has (the full answer is moments away).
        """
        done, rankings = self._latest
        position = self._names.index(done) + 1 if done is not None else 0
        if rankings is None or position >= len(self._names):
            return None
        running = self._names[position]
        source = f"stage {done!r}" if done is not None else "the supplied order"
        note = f"deadline reached before stage {running!r} finished; ranking from {source} returned"
        ranking = rankings[index]
        return replace(ranking, degraded=True, notes=[*ranking.notes, note], timings_ms=dict(ranking.timings_ms))


@dataclass(eq=False)
class Job:
    """One request waiting for, or riding in, a batch."""

    ranking: Ranking
    k: int | None
    deadline: float | None
    future: asyncio.Future[Ranking]
    enqueued: float = field(default_factory=time.monotonic)
    progress: Progress | None = None
    index: int = 0
    batch_size: int = 0
    started: float | None = None
    abandoned: bool = False


@dataclass(frozen=True)
class RunResult:
    ranking: Ranking
    batch_size: int
    queue_ms: float
    first: bool = True
    """The first request of its batch (a front end that records batch metrics records them from it)."""


class PipelineRunner:
    """Runs rankings of one kind (search or rerank) through one pipeline, alone or fused.

    ``max_batch=1, window_s=0`` is plain per-request execution with ``workers`` threads.
    ``lock`` is held for reading around every pipeline call (document writes take it for writing).
    """

    def __init__(
        self,
        pipeline: Pipeline,
        *,
        max_batch: int,
        window_s: float,
        workers: int,
        lock: ReadWriteLock,
        observer: BatchObserver | None = None,
        name: str = "",
        run: Callable[..., list[Ranking]] | None = None,
    ) -> None:
        """``run``: what runs a batch, with ``Pipeline.run``'s keywords (default ``pipeline.run``; the Ray
        back end passes one that retries a read caught between index generations, or hands the batch on
        to a reranker deployment after the first stage)."""
        self.pipeline = pipeline
        self._pipeline_run = run or pipeline.run
        self.max_batch = max_batch
        self.window_s = window_s
        self.lock = lock
        self.observer = observer
        self._stage_names = [s.name for s in pipeline.stages]
        # An empty pipeline over the same context finishes a fallback ranking exactly as a full
        # run finishes its output: top-k, then documents attached from the store.
        self._finisher = Pipeline(pipeline.name, [], pipeline.context)
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=f"pipeline-{name or pipeline.name}")
        self._slots = asyncio.Semaphore(workers)
        self._pending: deque[Job] = deque()
        self._wakeup = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._dispatcher = asyncio.create_task(self._dispatch(), name=f"batcher-{name or pipeline.name}")

    async def run(self, ranking: Ranking, *, k: int | None, deadline: float | None) -> RunResult:
        """Rank one request; past its deadline, return the best finished ranking (degraded)."""
        loop = asyncio.get_running_loop()
        job = Job(ranking=ranking, k=k, deadline=deadline, future=loop.create_future())
        # A late batch may fail after its waiters left with a fallback: keep that quiet.
        job.future.add_done_callback(lambda f: f.cancelled() or f.exception())
        self._pending.append(job)
        self._wakeup.set()
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            result = await asyncio.wait_for(asyncio.shield(job.future), timeout)
        except TimeoutError:
            result = await self._fallback(job)
        queue_ms = ((job.started or time.monotonic()) - job.enqueued) * 1000.0
        return RunResult(ranking=result, batch_size=job.batch_size or 1, queue_ms=queue_ms, first=job.index == 0)

    async def _fallback(self, job: Job) -> Ranking:
        if job.progress is not None:
            ranking = job.progress.fallback(job.index)
        else:  # still queued: only a supplied candidate list can be returned as it is
            start = [job.ranking] if job.ranking.candidates else None
            ranking = Progress(self._stage_names, start).fallback(0)
            job.abandoned = ranking is not None
        if ranking is None:  # nothing to fall back on, or nothing left to cut: wait for the run
            return await job.future
        return (await asyncio.to_thread(self._finisher.run, [ranking], k=job.k))[0]

    async def _dispatch(self) -> None:
        while True:
            await self._slots.acquire()
            while not self._pending:
                self._wakeup.clear()
                await self._wakeup.wait()
            first = self._pending[0]
            while len(self._pending) < self.max_batch:
                remaining = first.enqueued + self.window_s - time.monotonic()
                if remaining <= 0:
                    break
                self._wakeup.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wakeup.wait(), remaining)
            batch: list[Job] = []
            while self._pending and len(batch) < self.max_batch:
                job = self._pending.popleft()
                if not job.abandoned:
                    batch.append(job)
            if not batch:
                self._slots.release()
                continue
            task = asyncio.create_task(self._execute(batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _execute(self, batch: list[Job]) -> None:
        start = [j.ranking for j in batch] if all(j.ranking.candidates for j in batch) else None
        progress = Progress(self._stage_names, start)
        now = time.monotonic()
        for i, job in enumerate(batch):
            job.progress, job.index, job.batch_size, job.started = progress, i, len(batch), now
        try:
            loop = asyncio.get_running_loop()
            results = await loop.run_in_executor(self._executor, self._run_batch, batch, progress)
        except Exception as exc:  # handed to every waiter
            for job in batch:
                if not job.future.done():
                    job.future.set_exception(exc)
        else:
            for job, outcome in zip(batch, results, strict=True):
                if job.future.done():
                    continue
                if isinstance(outcome, Exception):
                    job.future.set_exception(outcome)
                else:
                    job.future.set_result(outcome)
        finally:
            self._slots.release()

    def _run_batch(self, batch: list[Job], progress: Progress) -> list[Ranking | Exception]:
        """In a worker thread: :func:`run_fused` under the read lock (the fused call reports its stages)."""

        def run(rankings: list[Ranking], k: int | None, deadline: float | None, fused: bool) -> list[Ranking]:
            with self.lock.read():
                return self._pipeline_run(rankings, k=k, deadline=deadline, on_stage=progress.update if fused else None)

        outcomes = run_fused(run, [(j.ranking, j.k, j.deadline) for j in batch])
        done = next((o for o in outcomes if not isinstance(o, Exception)), None)
        if self.observer is not None and done is not None:
            self.observer(len(batch), done.timings_ms)
        return outcomes

    async def close(self) -> None:
        """Stop taking batches, fail queued requests with 503, and wait for running model calls."""
        self._dispatcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._dispatcher
        for job in self._pending:
            if not job.future.done():
                job.future.set_exception(ServiceUnavailable("the service is shutting down"))
        self._pending.clear()
        await asyncio.to_thread(self._executor.shutdown, wait=True, cancel_futures=True)
