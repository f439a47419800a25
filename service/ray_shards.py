"""Shards served by Ray actors: one actor per shard of an index folder, shared by every process of the
application (the ingress that writes, each pipeline replica that searches).

:func:`install_shard_backend` makes every sharded stage built afterwards in this process scatter to
these actors instead of opening the shards itself. The actor of shard ``i`` of an ``N``-way split of
``index_dir`` is named ``shard-<digest of index_dir>-<N>-<i>`` in the Ray namespace of the service,
created by whichever process asks first (``get_if_exists``) and detached, so it outlives the
replica that made it. It serves the shard ``i`` of every sharded stage over that folder (BM25 and
dense of a hybrid pipeline), each through a :class:`~streamrank.index.shard_worker.ShardWorker`.

State: the shard's index files live in ``<index_dir>/shards-<N>/<i>/``; every write is acknowledged
only after the actor persisted it (and after the document store, which is written first). A
restarted actor (``max_restarts=-1``; a call in flight is retried, writes being idempotent upserts
and deletes by id) reopens its files and repairs its shard from the store on first use
(``ShardWorker.recover``), so no acknowledged write is lost when a shard's process dies.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from pathlib import Path
from typing import Any

import ray

from streamrank.index.shard_worker import ShardSpec, ShardWorker, use_shard_backend
from streamrank.service.ray_settings import RaySettings

log = logging.getLogger("streamrank.service.ray")


class ShardServer:
    """The Ray actor of one shard: the shard's workers of every sharded stage over one index folder."""

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
        self.repaired: dict[str, int] = {}
        self._lock = threading.Lock()

    def call(self, key: str, options: dict[str, Any], method: str, *args: Any) -> Any:
        """``ShardWorker.<method>(*args)`` of the stage ``key`` (made, and repaired from the store, on first use)."""
        return getattr(self._worker(key, options), method)(*args)

    def _worker(self, key: str, options: dict[str, Any]) -> ShardWorker:
        with self._lock:
            worker = self.workers.get(key)
            if worker is None:
                worker = ShardWorker(options, self.context, self.shard, self.shards)
                self.repaired[key] = worker.recover()
                if self.repaired[key]:
                    log.warning("shard %d/%d: repaired %d documents from the store", self.shard, self.shards, self.repaired[key])
                self.workers[key] = worker
            return worker

    def status(self) -> dict[str, Any]:
        """Which stages this shard serves and what it repaired when they were opened."""
        return {"shard": self.shard, "shards": self.shards, "stages": list(self.workers), "repaired": dict(self.repaired)}


ShardActor = ray.remote(ShardServer)


def actor_name(index_dir: Path, shards: int, shard: int) -> str:
    digest = hashlib.blake2b(str(Path(index_dir).resolve()).encode(), digest_size=6).hexdigest()
    return f"shard-{digest}-{shards}-{shard}"


class RayShardGroup:
    """The shards of one sharded stage, as handles to their actors (calls go out in parallel)."""

    def __init__(self, spec: ShardSpec, ray_settings: RaySettings, torch_threads: int | None = None) -> None:
        context = spec.context
        index_dir = context.require_index_dir("a sharded index")
        self.shards, self.key, self.options = spec.shards, spec.key, spec.options
        self.actors = [
            ShardActor.options(
                name=actor_name(index_dir, spec.shards, i),
                namespace=ray_settings.namespace,
                get_if_exists=True,
                lifetime="detached",
                max_restarts=-1,
                max_task_retries=-1,
                max_concurrency=ray_settings.shard_concurrency,
                num_cpus=ray_settings.shard_cpus,
            ).remote(str(index_dir), context.corpus, context.device, i, spec.shards, torch_threads)
            for i in range(spec.shards)
        ]

    def call(self, method: str, args: dict[int, tuple[Any, ...]]) -> dict[int, Any]:
        shards = sorted(args)
        refs = [self.actors[i].call.remote(self.key, self.options, method, *args[i]) for i in shards]
        return dict(zip(shards, ray.get(refs), strict=True))

    def close(self) -> None:
        """Nothing: the actors are shared; :func:`stop_shard_actors` ends them with the application."""


def install_shard_backend(ray_settings: RaySettings, torch_threads: int | None = None) -> None:
    """Serve the shards of every sharded stage built from now on in this process by Ray actors."""
    use_shard_backend(lambda spec: RayShardGroup(spec, ray_settings, torch_threads))


def shard_actors(namespace: str) -> list[str]:
    """Names of the shard actors alive in ``namespace``."""
    from ray.util import list_named_actors

    return sorted(
        a["name"] for a in list_named_actors(all_namespaces=True)
        if a.get("namespace") == namespace and a["name"].startswith("shard-")
    )


def stop_shard_actors(namespace: str) -> int:
    """Kill every shard actor of the namespace (they are detached: they would outlive the application)."""
    names = shard_actors(namespace)
    for name in names:
        try:
            ray.kill(ray.get_actor(name, namespace=namespace), no_restart=True)
        except ValueError:  # already gone
            pass
    return len(names)
