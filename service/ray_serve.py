"""The service on Ray Serve: ``streamrank serve --ray [--address ADDR]`` (or ``ray = {...}`` in the
settings file). Imported only then: without it the service never imports Ray.

Application ``streamrank`` (one Serve application, route ``/``), every call between deployments an
awaited handle call (:mod:`streamrank.service.ray_calls`):

- ``ingress`` (``ray.ingress``: N replicas or autoscaling): the FastAPI app of ``streamrank serve``
  (:func:`create_app` as ``serve.ingress``) with every route, limit, error and metric, and no state:
  no store, no lock, no index, no model. Searches and reranks go to ``pipeline-<name>``, document
  reads and writes to ``writer`` (:class:`RayServiceState`).
- ``writer`` (exactly one replica): loads the pipelines, owns the document store and applies every
  write: the store first (fsynced), then each index (shards included), acknowledged after both. It
  publishes each write as a new index generation (the index manifests); readers follow it.
- ``pipeline-<name>`` (one per served pipeline): replicas that each load the pipeline read only and
  batch requests with the in-process service's own batcher (:class:`PipelineRunner`, with
  :func:`~streamrank.service.batching.run_fused` and the service's bounds). ``serve.batch`` is not used:
  it forms the next batch while the previous one still runs (before its concurrency slot is free), so
  under load its batches stay at what arrives within one window (1.5 requests at 32 clients here);
  the runner forms a batch once a worker is free, from everything that queued meanwhile. A replica
  follows the index generations the writer publishes before it searches, so an acknowledged write is
  seen by the next search on every replica.
- ``rerank-<name>`` (pipelines whose placement has ``rerankers = {...}``): the stages from the first
  reranker on, in replicas of their own; the ``pipeline-<name>`` replicas run the stages before it.
- ``shard-<name>-<i>`` (pipelines with ``shards = N``): :mod:`streamrank.service.ray_shards`; the
  pipeline replica's sharded stages scatter to them with ``await asyncio.gather``.

Failures: Serve's health checks replace dead replicas; a read whose replica died is sent again (at most
twice); a request whose ingress replica died is sent again by the HTTP proxy (:mod:`~streamrank.service.ray_proxy`),
or answered 503 with ``Retry-After``; a deployment with no healthy replica answers 503 with ``Retry-After`` within
``ray.call_timeout_s``; errors cross deployments by class (:mod:`streamrank.service.wire`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import ray
from ray import serve
from ray.exceptions import RayActorError

from streamrank.service.app import create_app
from streamrank.service.batching import (
    BatchObserver,
    BatchPolicy,
    PipelineRunner,
    ReadWriteLock,
    RunResult,
    ServiceUnavailable,
    warm_up,
)
from streamrank.service.metrics import Metrics
from streamrank.service.ray_calls import call, read_consistent
from streamrank.service.ray_settings import DeploymentSettings, RaySettings
from streamrank.service.ray_shards import ServeShardGroup, ShardReplica, shard_deployment
from streamrank.service.settings import Settings
from streamrank.service.state import ServiceState
from streamrank.service.wire import Raised, answer, answer_async
from streamrank.types import Document, Ranking

log = logging.getLogger("streamrank.service.ray")

PASSED_ENV = (
    "STREAMRANK_HOME", "STREAMRANK_DATASETS", "STREAMRANK_MODELS", "STREAMRANK_OFFLINE", "HF_HUB_OFFLINE",
    "TRANSFORMERS_OFFLINE", "OMP_NUM_THREADS", "TOKENIZERS_PARALLELISM", "TRITON_INTERPRET",
    "RAY_SERVE_QUEUE_LENGTH_RESPONSE_DEADLINE_S", "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH",
)
"""Environment the driver hands to every replica (models and data found the same way)."""
WRITER = "writer"


@dataclass
class Reply:
    """What a pipeline replica answers for one request."""

    ranking: Ranking | None
    batch_size: int
    queue_ms: float
    first: bool
    """The first request of its batch: the ingress records the batch's metrics once, from it."""
    error: Raised | None = None


def reranker_split(ref: str) -> int | None:
    """Position of the pipeline's first reranker stage (where a ``rerank-<name>`` deployment takes over);
    None when it has none. Reads the file only: nothing is built or loaded."""
    from streamrank.compose import validate_stage
    from streamrank.config import read_config
    from streamrank.rankers.base import Reranker

    config, source = read_config(ref)
    for i, options in enumerate(config.stages):
        cls, _ = validate_stage(options, f"{source}: stages[{i}]")
        if issubclass(cls, Reranker):
            return i if i > 0 else None  # a pipeline that only reranks has no first stage to split off
    return None


def _torch_threads(settings: Settings) -> None:
    if settings.torch_threads is not None:
        import torch

        torch.set_num_threads(settings.torch_threads)


def _deadline(remaining_s: float | None) -> float | None:
    return None if remaining_s is None else time.monotonic() + remaining_s


def _remaining(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.0, deadline - time.monotonic())


class PipelineReplica:
    """A replica of ``pipeline-<name>``: the pipeline loaded read only; requests batched by the service's
    own :class:`PipelineRunner` (the in-process batcher: a batch is formed when a worker is free, so under
    load it takes everything that queued meanwhile; deadlines give the last finished stage's ranking).

    ``rerankers`` (a handle of ``rerank-<name>``): run the stages before ``split`` here and the rest
    there. ``shards`` (handles of ``shard-<name>-<i>``): every sharded stage scatters to them."""

    def __init__(
        self, ref: str, settings: dict[str, Any], rerankers: Any = None, split: int | None = None,
        shards: list[Any] | None = None,
    ) -> None:
        from streamrank.compose import load_pipeline
        from streamrank.index.sharded_stage import ShardedRetriever

        s = Settings.model_validate(settings)
        _torch_threads(s)
        self.timeout_s = (s.ray or RaySettings()).call_timeout_s
        self.pipeline = load_pipeline(ref, corpus=s.corpus, index_dir=s.index_dir)
        self.rerankers, self.split = rerankers, split
        self.loop: asyncio.AbstractEventLoop | None = None
        sharded = [stage for stage in self.pipeline.iter_stages() if isinstance(stage, ShardedRetriever)]
        for stage in sharded:
            if not shards or len(shards) != stage.n:
                raise ServiceUnavailable(f"pipeline {self.pipeline.name!r}: stage {stage.name!r} has no shard deployments")
            stage.serve_shards(
                ServeShardGroup(stage.spec, shards, self._loop, pipeline=self.pipeline.name, timeout_s=self.timeout_s)
            )
        self.policy = BatchPolicy.of(s)
        self.runners: dict[str, PipelineRunner] = {}
        self.lock = ReadWriteLock()  # nothing writes here: the writer deployment does
        self.warm = s.warmup and bool(sharded)  # sharded: warmed by ready() (the shard calls need the event loop)
        if s.warmup and not sharded:
            warm_up(self.pipeline, slice(0, split) if rerankers is not None else None)

    def _loop(self) -> asyncio.AbstractEventLoop:
        assert self.loop is not None, "the replica's event loop is known once a request came in"
        return self.loop

    def _runner(self, kind: str) -> PipelineRunner:
        """The batcher of ``kind`` (search or rerank), made on the replica's event loop at first use."""
        self.loop = asyncio.get_running_loop()
        if kind not in self.runners:
            self.runners[kind] = PipelineRunner(
                self.pipeline, max_batch=self.policy.max_batch, window_s=self.policy.window_s,
                workers=self.policy.workers, lock=self.lock, name=f"{self.pipeline.name}-{kind}", run=self._run,
            )
        return self.runners[kind]

    async def ready(self) -> bool:
        """Warm the pipeline (models loaded, indexes and shards open) before traffic; called by the ingress."""
        self.loop = asyncio.get_running_loop()
        if self.warm:
            stages = slice(0, self.split) if self.rerankers is not None else None
            await asyncio.to_thread(read_consistent, lambda: warm_up(self.pipeline, stages))
            self.warm = False
        return True

    async def search(self, ranking: Ranking, k: int | None, remaining_s: float | None) -> Reply:
        return await self._rank("search", ranking, k, remaining_s)

    async def rerank(self, ranking: Ranking, k: int | None, remaining_s: float | None) -> Reply:
        return await self._rank("rerank", ranking, k, remaining_s)

    async def _rank(self, kind: str, ranking: Ranking, k: int | None, remaining_s: float | None) -> Reply:
        try:
            result = await self._runner(kind).run(ranking, k=k, deadline=_deadline(remaining_s))
        except Exception as exc:  # sent back by type (wire.Raised)
            return Reply(ranking=None, batch_size=0, queue_ms=0.0, first=False, error=Raised.of(exc))
        return Reply(ranking=result.ranking, batch_size=result.batch_size, queue_ms=result.queue_ms, first=result.first)

    def batch_bounds(self) -> dict[str, float]:
        """The bounds this replica batches with (for tests and operators)."""
        return {"max_batch": self.policy.max_batch, "window_s": self.policy.window_s, "workers": self.policy.workers}

    def _run(self, rankings: list[Ranking], **options: Any) -> list[Ranking]:
        """In a worker thread: the pipeline over one batch (``Pipeline.run``'s keywords), or its first
        stage here and the rest in the reranker deployment."""
        if self.rerankers is None:
            return read_consistent(lambda: self.pipeline.run(rankings, **options))
        k, deadline = options.pop("k", None), options.get("deadline")
        first = read_consistent(lambda: self.pipeline.run(rankings, stages=slice(0, self.split), **options))
        what = f"the rerankers of pipeline {self.pipeline.name!r}"
        send = partial(self.rerankers.run.remote, first, k, _remaining(deadline))
        return asyncio.run_coroutine_threadsafe(call(send, what, timeout_s=self.timeout_s), self._loop()).result()


class RerankerReplica:
    """A replica of ``rerank-<name>``: the pipeline's stages from ``split`` on, run on the batches the
    first-stage replicas formed (no second batching window)."""

    def __init__(self, ref: str, settings: dict[str, Any], split: int) -> None:
        from streamrank.compose import load_pipeline

        s = Settings.model_validate(settings)
        _torch_threads(s)
        self.pipeline = load_pipeline(ref, corpus=s.corpus, index_dir=s.index_dir)
        self.split = split
        if s.warmup:
            warm_up(self.pipeline, slice(split, None))

    async def run(self, rankings: list[Ranking], k: int | None, remaining_s: float | None) -> list[Ranking] | Raised:
        deadline, stages = _deadline(remaining_s), slice(self.split, None)
        return await asyncio.to_thread(answer, lambda: self.pipeline.run(rankings, k=k, deadline=deadline, stages=stages))


class WriterReplica:
    """The ``writer`` deployment (one replica): the pipelines loaded with their store, every document
    read and write (:class:`ServiceState`'s write path: store first, then each index, under one lock)."""

    def __init__(self, settings: dict[str, Any]) -> None:
        s = Settings.model_validate(settings)
        _torch_threads(s)
        self.state = ServiceState(s, Metrics())
        self.state.load_pipelines()  # recovers every index from the store (shards included), warms up
        self.state.status = "ready"

    async def describe(self) -> dict[str, Any] | Raised:
        """The served pipelines, as ``/pipelines`` shows them, and the default one."""

        def views() -> dict[str, Any]:
            return {"default": self.state.default, "pipelines": [PipelineView.of(p) for p in self.state.pipelines.values()]}

        return answer(views)

    async def upsert(self, pipeline: str, documents: list[Document]) -> None | Raised:
        return await answer_async(lambda: self.state.upsert_async(self.state.pipeline(pipeline), documents))

    async def delete_many(self, pipeline: str, doc_ids: list[str]) -> tuple[list[str], list[str]] | Raised:
        return await answer_async(lambda: self.state.delete_many_async(self.state.pipeline(pipeline), doc_ids))

    async def get(self, pipeline: str, doc_id: str) -> Document | None | Raised:
        return await answer_async(lambda: self.state.get_async(self.state.pipeline(pipeline), doc_id))

    async def readiness(self) -> dict[str, Any] | Raised:
        return await answer_async(self.state.ready_report)


# ---- the ingress ------------------------------------------------------------------------------
@dataclass(frozen=True)
class StageView:
    @dataclass(frozen=True)
    class Kind:
        kind: str

    name: str
    config: Kind


@dataclass(frozen=True)
class ContextView:
    corpus: str | None
    index_dir: Path | None


@dataclass(frozen=True)
class PipelineView:
    """What the stateless ingress knows of a pipeline (what ``/pipelines`` shows): no stage is built."""

    name: str
    description: str | None
    stages: list[StageView]
    source: Path | None
    context: ContextView
    quarantined: dict[str, str] = field(default_factory=dict)

    @classmethod
    def of(cls, pipeline: Any) -> PipelineView:
        stages = [StageView(s.name, StageView.Kind(s.config.kind)) for s in pipeline.stages]
        context = ContextView(pipeline.context.corpus, pipeline.context.index_dir)
        return cls(pipeline.name, pipeline.description, stages, pipeline.source, context)

    def close(self) -> None:
        """Nothing to release."""


class RayRunner:
    """Stands in for :class:`~streamrank.service.batching.PipelineRunner` in the ingress: one awaited call
    to the pipeline deployment per request (its replicas batch)."""

    def __init__(self, handle: Any, kind: str, observer: BatchObserver | None, *, what: str, timeout_s: float) -> None:
        self.handle, self.kind, self.observer, self.what, self.timeout_s = handle, kind, observer, what, timeout_s

    async def run(self, ranking: Ranking, *, k: int | None, deadline: float | None) -> RunResult:
        method = getattr(self.handle, self.kind)
        reply: Reply = await call(lambda: method.remote(ranking, k, _remaining(deadline)), self.what, timeout_s=self.timeout_s)
        if reply.error is not None:
            raise reply.error.rebuild()
        assert reply.ranking is not None
        if reply.first and self.observer is not None:
            self.observer(reply.batch_size, reply.ranking.timings_ms)
        return RunResult(ranking=reply.ranking, batch_size=reply.batch_size, queue_ms=reply.queue_ms, first=reply.first)

    async def close(self) -> None:
        """Nothing to stop here: the replicas belong to Serve."""


class RayServiceState(ServiceState):
    """The ingress's state: no pipeline, store or lock here. What is served comes from the writer;
    searches and reranks go to the pipeline deployments, document reads and writes to the writer."""

    def __init__(self, settings: Settings, metrics: Metrics, *, handles: dict[str, Any], writer: Any, app_name: str) -> None:
        super().__init__(settings, metrics)
        self.handles, self.writer, self.app_name = handles, writer, app_name
        self.timeout_s = (settings.ray or RaySettings()).call_timeout_s

    async def _writer(self, method: str, *args: Any) -> Any:
        send = partial(getattr(self.writer, method).remote, *args)
        retries = 2 if method in ("describe", "get", "readiness") else 0  # a write is never sent twice
        return await call(send, f"deployment {WRITER!r}", timeout_s=self.timeout_s, retries=retries)

    async def _load(self) -> None:
        started = time.perf_counter()
        while True:  # the writer loads the pipelines (and recovers them) before it answers
            try:
                described = await self._writer("describe")
                break
            except ServiceUnavailable:
                log.info("waiting for the writer to load the pipelines")
            except Exception as exc:  # e.g. a pipeline file that does not load: reported by /readyz
                self.status, self.error = "error", f"{type(exc).__name__}: {exc}"
                return
        self.pipelines = {p.name: p for p in described["pipelines"]}  # type: ignore[misc]
        self.default = described["default"]
        for name in self.pipelines:
            what = f"deployment 'pipeline-{name}'"
            while True:  # its replicas load and warm up first
                try:
                    await call(lambda n=name: self.handles[n].ready.remote(), what, timeout_s=self.timeout_s)
                    break
                except ServiceUnavailable:
                    log.info("waiting for %s", what)
                except Exception as exc:
                    self.status, self.error = "error", f"{what}: {type(exc).__name__}: {exc}"
                    return
            for kind in ("search", "rerank"):
                observer = self.metrics.batch_observer(name, kind)
                self._runners[(name, kind)] = RayRunner(self.handles[name], kind, observer, what=what, timeout_s=self.timeout_s)  # type: ignore[assignment]
        self.status = "ready"
        self.metrics.ready.set(1)
        log.info("ingress ready: %s in %.1f s", ", ".join(self.pipelines), time.perf_counter() - started)

    async def close(self) -> None:
        if self._loader is not None and not self._loader.done():
            self._loader.cancel()
        self.status = "stopping"
        self.metrics.ready.set(0)

    async def ready_report(self) -> dict[str, Any]:
        self.require_ready()
        report = await self._writer("readiness")
        report["pipelines"] = list(self.pipelines)
        down, problems = await asyncio.to_thread(deployment_problems, self.app_name)
        if down:
            raise ServiceUnavailable("; ".join(down))
        if problems:
            report["status"] = "degraded"
            report["problems"] = [*report["problems"], *problems]
        return report

    async def upsert_async(self, pipeline: Any, documents: Any) -> None:
        await self._counted("upsert", len(documents), self._writer("upsert", pipeline.name, list(documents)))

    async def delete_many_async(self, pipeline: Any, doc_ids: Any) -> tuple[list[str], list[str]]:
        deleted, missing = await self._counted("delete", None, self._writer("delete_many", pipeline.name, list(doc_ids)))
        if deleted:
            self.metrics.documents_written.labels("delete").inc(len(deleted))
        return deleted, missing

    async def delete_async(self, pipeline: Any, doc_id: str) -> str | None:
        deleted, _ = await self.delete_many_async(pipeline, [doc_id])
        return deleted[0] if deleted else None

    async def get_async(self, pipeline: Any, doc_id: str) -> Document | None:
        return await self._writer("get", pipeline.name, doc_id)

    async def _counted(self, operation: str, count: int | None, write: Any) -> Any:
        from streamrank.pipeline import DocumentsRefused
        from streamrank.store import StorageError

        try:
            result = await write
        except StorageError as exc:
            self.metrics.write_errors.labels(exc.problem).inc()
            self.metrics.writable.set(0)
            raise
        except DocumentsRefused:
            self.metrics.write_errors.labels("refused").inc()
            raise
        if count:
            self.metrics.documents_written.labels(operation).inc(count)
        return result


def deployment_problems(app_name: str) -> tuple[list[str], list[str]]:
    """(deployments that serve requests without a running replica, deployments not fully healthy) of the app."""
    app = serve.status().applications.get(app_name)
    if app is None:
        return [f"Serve application {app_name!r} is not running"], []
    down, problems = [], []
    for name, deployment in app.deployments.items():
        running = deployment.replica_states.get("RUNNING", 0)
        state = str(getattr(deployment.status, "value", deployment.status))
        if name != "ingress" and running == 0:
            down.append(f"deployment {name!r} has no running replica ({state})")
        elif state != "HEALTHY":
            problems.append(f"deployment {name!r}: {state}, {running} replicas running ({deployment.message or 'no message'})")
    return down, problems


@serve.ingress()
class Ingress:
    """The ingress deployment: ``create_app`` with a :class:`RayServiceState` (stateless, replicable)."""

    def __init__(self, settings: dict[str, Any], handles: dict[str, Any], writer: Any, app_name: str) -> None:
        self.settings = Settings.model_validate(settings).model_copy(update={"warmup": False})
        self.handles, self.writer, self.app_name = handles, writer, app_name

    def __serve_build_asgi_app__(self) -> Any:
        state = partial(RayServiceState, handles=self.handles, writer=self.writer, app_name=self.app_name)
        return create_app(self.settings, state_class=state)


# ---- building and running the application -------------------------------------------------------
def absolute_settings(settings: Settings) -> Settings:
    """Pipeline files and the index folder as absolute paths (replicas do not share the driver's cwd)."""
    from streamrank.config import resolve_config_path

    update: dict[str, Any] = {"pipelines": [str(resolve_config_path(p).resolve()) for p in settings.pipelines]}
    if settings.index_dir:
        update["index_dir"] = str(Path(settings.index_dir).expanduser().resolve())
    if settings.ray is None:
        update["ray"] = RaySettings()
    return settings.model_copy(update=update)


def build_application(settings: Settings) -> Any:
    """The bound Serve application: writer, one deployment per pipeline (and its rerankers and shards),
    the ingress in front."""
    from streamrank.compose import load_pipeline
    from streamrank.config import read_config
    from streamrank.errors import ConfigError

    settings = absolute_settings(settings)
    ray_settings = settings.ray or RaySettings()
    policy = BatchPolicy.of(settings)
    payload = settings.model_dump(mode="json")
    env = {"env_vars": {k: os.environ[k] for k in PASSED_ENV if k in os.environ}}
    logging_config = {"log_level": settings.log_level.upper(), "enable_access_log": False}  # the app logs and counts requests

    def options(name: str, placement: DeploymentSettings) -> dict[str, Any]:
        return deployment_options(name, placement, policy, env, logging_config)

    handles: dict[str, Any] = {}
    for ref in settings.pipelines:
        config = read_config(ref)[0]
        name = config.name
        if name in handles:
            raise ConfigError(f"two pipelines are named {name!r} ({ref}); give them distinct names")
        placement = ray_settings.deployment(name)
        rerankers, split = None, None
        if placement.rerankers is not None:
            split = reranker_split(ref)
            own = ray_settings.pipelines.get(name)
            if split is None and own is not None and "rerankers" in own.model_fields_set:
                raise ConfigError(
                    f"ray.pipelines.{name}.rerankers: pipeline {name!r} ({ref}) has no reranker after a first "
                    "stage to deploy apart; remove `rerankers` from its table"
                )
        if split is not None:
            rerankers = serve.deployment(RerankerReplica).options(**options(f"rerank-{name}", placement.rerankers)).bind(ref, payload, split)
        shards = None
        if config.shards > 1:
            built = load_pipeline(ref, corpus=settings.corpus, index_dir=settings.index_dir)  # stages built, nothing loaded
            index_dir = built.context.index_dir
            built.close()
            shards = [
                serve.deployment(ShardReplica).options(**options(shard_deployment(name, i), ray_settings.shard)).bind(
                    str(index_dir), settings.corpus or config.corpus, config.device, i, config.shards, settings.torch_threads
                )
                for i in range(config.shards)
            ]
        handles[name] = serve.deployment(PipelineReplica).options(**options(f"pipeline-{name}", placement)).bind(
            ref, payload, rerankers, split, shards
        )
    writer = serve.deployment(WriterReplica).options(**options(WRITER, ray_settings.writer)).bind(payload)
    ingress = serve.deployment(Ingress).options(**options("ingress", ray_settings.ingress))
    return ingress.bind(payload, handles, writer, ray_settings.app_name)


def deployment_options(
    name: str, placement: DeploymentSettings, policy: BatchPolicy, env: dict[str, Any], logging_config: dict[str, Any]
) -> dict[str, Any]:
    """Serve options of one deployment: replicas (or autoscaling), CPUs/GPUs/resources per replica, queue bound."""
    actor: dict[str, Any] = {"num_cpus": placement.num_cpus, "num_gpus": placement.num_gpus, "runtime_env": env}
    if placement.resources:
        actor["resources"] = dict(placement.resources)
    options: dict[str, Any] = {
        "name": name,
        "ray_actor_options": actor,
        "max_ongoing_requests": placement.max_ongoing_requests or max(64, 8 * policy.max_batch * policy.workers),
        "logging_config": logging_config,
        "health_check_period_s": 5,
        "health_check_timeout_s": 30,  # loaded CPUs answer slowly
    }
    if placement.max_replicas_per_node is not None:
        options["max_replicas_per_node"] = placement.max_replicas_per_node
    if placement.autoscaling is not None:
        options["autoscaling_config"] = placement.autoscaling.model_dump()
    else:
        options["num_replicas"] = placement.replicas
    return options


def serve_environment() -> None:
    """Serve's settings from the environment, set (unless given) before Ray starts so every node's
    processes inherit them: a longer queue-length probe deadline (loaded CPUs answer slowly) and the HTTP
    proxy's middleware that sends again a request whose ingress replica died (:mod:`~streamrank.service.ray_proxy`).
    A cluster started with ``ray start`` needs them in the environment of ``ray start`` on each node."""
    from streamrank.service.ray_proxy import CALLBACK

    os.environ.setdefault("RAY_SERVE_QUEUE_LENGTH_RESPONSE_DEADLINE_S", "1.0")
    os.environ.setdefault("RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH", CALLBACK)


def start_ray(ray_settings: RaySettings, **init: Any) -> None:
    """Join the cluster at ``address``, or start a local head (127.0.0.1, no dashboard)."""
    serve_environment()
    if ray.is_initialized():
        return
    options: dict[str, Any] = {"namespace": ray_settings.namespace, "include_dashboard": False}
    if ray_settings.address:
        options["address"] = ray_settings.address
    else:  # a head of its own: never join another cluster running on this machine by accident
        options.update(address="local", _node_ip_address="127.0.0.1")
    options["runtime_env"] = {"env_vars": {k: os.environ[k] for k in PASSED_ENV if k in os.environ}}
    ray.init(**{**options, **init})


def deploy(settings: Settings, proxy_location: str = "EveryNode") -> str:
    """Start Serve on ``host:port`` and deploy the application; returns its URL. ``HeadOnly`` for several
    nodes on one machine (every node's proxy would bind the same address)."""
    settings = absolute_settings(settings)
    ray_settings = settings.ray or RaySettings()
    start_ray(ray_settings)
    for attempt in (1, 2):
        try:
            serve.start(proxy_location=proxy_location, http_options={"host": settings.host, "port": settings.port})
            break
        except RayActorError:  # the HTTP proxy died while starting (seen on a saturated machine)
            if attempt == 2:
                raise
            log.warning("Ray Serve's HTTP proxy died while starting; shutting Serve down and starting it again")
            serve.shutdown()
    serve.run(build_application(settings), name=ray_settings.app_name, route_prefix="/", blocking=False)
    return f"http://{settings.host}:{settings.port}"


def undeploy(settings: Settings) -> None:
    """Delete the application: Serve stops every deployment (shards included; nothing outlives it)."""
    serve.delete((settings.ray or RaySettings()).app_name)


def run_on_ray(settings: Settings) -> None:
    """``streamrank serve --ray``: deploy, serve until SIGTERM/SIGINT, then delete the application."""
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    url = deploy(settings)
    log.info("serving on Ray at %s (application %r)", url, (settings.ray or RaySettings()).app_name)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    log.info("stopping: deleting the application")
    undeploy(settings)
    if not (settings.ray and settings.ray.address):
        serve.shutdown()
        ray.shutdown()


def with_ray(settings: Settings, address: str | None) -> Settings:
    """``settings`` with the Ray back end on (``--ray``), joining ``address`` when given."""
    ray_settings = settings.ray or RaySettings()
    if address:
        ray_settings = ray_settings.model_copy(update={"address": address})
    return settings.model_copy(update={"ray": ray_settings})


__all__ = ["build_application", "deploy", "run_on_ray", "serve_environment", "undeploy", "with_ray"]
