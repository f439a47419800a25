"""Shards as Ray Serve deployments: ``shard-<pipeline>-<i>`` serves shard ``i`` of every sharded stage of
one pipeline (BM25 and dense of a hybrid), with ``replicas >= 1`` each, inside Serve's lifecycle
(health checks, restarts, autoscaling, deleted with the application). No detached actors.

Shard replicas only read: the writer deployment writes every shard's index files (store first, then
the shards, acknowledged after both; :mod:`streamrank.service.ray_serve`), and a shard replica
reopens a shard's index when its manifest changes (the generation the writer published), so an
acknowledged write is seen by the next search on every replica. A replica that restarts opens the
current files.

A pipeline replica hands each of its sharded stages a :class:`ServeShardGroup`
(``ShardedRetriever.serve_shards``): the stage's scatter becomes ``await asyncio.gather`` over the
shard deployments' handles, each call bounded (:func:`~streamrank.service.ray_calls.call`: a read
whose replica died is asked again; no healthy replica -> 503 with ``Retry-After``).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from streamrank.index.shard_worker import ShardSpec, ShardWorker
from streamrank.service.ray_calls import call, read_consistent
from streamrank.service.wire import Raised, answer
from streamrank.types import Ranking


def shard_deployment(pipeline: str, shard: int) -> str:
    """The Serve name of shard ``shard`` of ``pipeline``."""
    return f"shard-{pipeline}-{shard}"


class ShardReplica:
    """A replica of ``shard-<pipeline>-<i>``: that shard of each sharded stage (opened on first use), read only."""

    def __init__(
        self, index_dir: str, corpus: str | None, device: str | None, shard: int, shards: int, torch_threads: int | None
    ) -> None:
        from streamrank.compose import FACTORY
        from streamrank.context import PipelineContext

        if torch_threads is not None:
            import torch

            torch.set_num_threads(torch_threads)
        self.shard, self.shards = shard, shards
        self.context = PipelineContext(Path(index_dir), corpus=corpus, device=device, factory=FACTORY)
        self.workers: dict[str, ShardWorker] = {}
        self.lock = threading.Lock()

    def worker(self, key: str, options: dict[str, Any]) -> ShardWorker:
        with self.lock:
            if key not in self.workers:
                self.workers[key] = ShardWorker(options, self.context, self.shard, self.shards)
            return self.workers[key]

    async def _read(self, key: str, options: dict[str, Any], read: Callable[[ShardWorker], Any]) -> Any:
        return await asyncio.to_thread(answer, lambda: read_consistent(lambda: read(self.worker(key, options))))

    async def search(
        self, key: str, options: dict[str, Any], rankings: Sequence[Ranking], prepared: Any, depth: int
    ) -> list[list[tuple[str, float]]] | Raised:
        return await self._read(key, options, lambda w: w.search(rankings, prepared, depth))

    async def score_pool(self, key: str, options: dict[str, Any], rankings: Sequence[Ranking], prepared: Any) -> Any:
        return await self._read(key, options, lambda w: w.score_pool(rankings, prepared))

    async def indexed_ids(self, key: str, options: dict[str, Any]) -> list[str] | Raised:
        return await self._read(key, options, lambda w: w.indexed_ids())

    async def has_index(self, key: str, options: dict[str, Any]) -> bool | Raised:
        return await self._read(key, options, lambda w: w.has_index())

    def status(self) -> dict[str, Any]:
        """Which shard this replica serves, on which Ray node, and the stages it has opened."""
        import ray

        node = ray.get_runtime_context().get_node_id()
        return {"shard": self.shard, "shards": self.shards, "node": node, "stages": sorted(self.workers)}


class ServeShardGroup:
    """The shards of one sharded stage as Serve deployments (a :class:`~streamrank.index.shard_worker.ShardGroup`).

    ``call`` is made by the stage in a pipeline worker thread; it runs :meth:`gather` on the replica's
    event loop (``loop()``), which awaits every shard's handle at once."""

    READS = frozenset({"search", "score_pool", "indexed_ids", "has_index"})

    def __init__(
        self, spec: ShardSpec, handles: Sequence[Any], loop: Callable[[], asyncio.AbstractEventLoop], *,
        pipeline: str, timeout_s: float,
    ) -> None:
        self.shards, self.key, self.options = spec.shards, spec.key, spec.options
        self.handles, self.loop, self.pipeline, self.timeout_s = list(handles), loop, pipeline, timeout_s

    def call(self, method: str, args: dict[int, tuple[Any, ...]]) -> dict[int, Any]:
        if method not in self.READS:
            raise RuntimeError(f"shard deployments only read; {method!r} belongs to the writer deployment")
        return asyncio.run_coroutine_threadsafe(self.gather(method, args), self.loop()).result()

    async def gather(self, method: str, args: dict[int, tuple[Any, ...]]) -> dict[int, Any]:
        """``method`` on each shard in ``args`` at once; results by shard."""
        shards = sorted(args)
        replies = await asyncio.gather(*(self.one(i, method, args[i]) for i in shards))
        return dict(zip(shards, replies, strict=True))

    async def one(self, shard: int, method: str, args: tuple[Any, ...]) -> Any:
        handle = getattr(self.handles[shard], method)
        what = f"deployment {shard_deployment(self.pipeline, shard)!r}"
        return await call(lambda: handle.remote(self.key, self.options, *args), what, timeout_s=self.timeout_s)

    def close(self) -> None:
        """Nothing: the shard replicas belong to Serve."""
