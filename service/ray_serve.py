"""The service on Ray Serve: ``streamrank serve --ray [--address ADDR]`` (or ``ray = {...}`` in the
settings file). Imported only then: without it the service never imports Ray.

Application ``streamrank`` (one Serve application, route ``/``):

- ``ingress`` (1 replica): the same FastAPI app as ``streamrank serve`` (:func:`create_app`, as the
  ingress through ``serve.ingress``), with every route, limit, error and metric. It holds the
  document store and applies writes (store first, then every index, acknowledged after both) and
  sends each search or rerank to the pipeline's deployment through a deployment handle
  (:class:`RayServiceState`).
- ``pipeline-<name>`` (one per served pipeline): replicas that each load the pipeline (indexes
  open, models warm) and run requests fused by ``serve.batch`` with the service's own batching
  bounds (:class:`~streamrank.service.batching.BatchPolicy`: ``batch_window_ms``,
  ``max_batch_size``, ``workers``): one batching policy, two back ends. Replicas, CPUs and GPUs per
  replica and autoscaling bounds come from ``ray = {...}`` (:mod:`streamrank.service.ray_settings`).
- ``rerank-<name>`` (pipelines whose placement has ``rerankers = {...}``): the pipeline's stages from
  its first reranker on, in replicas of their own; the ``pipeline-<name>`` replicas then run only the
  stages before it (the first stage) and hand each formed batch on through a deployment handle, so a
  GPU reranker with one replica can sit behind several CPU retrieval replicas. The rankings equal
  those of the whole pipeline in one process (the same stages run on the same rankings).
- shard actors (pipelines with ``shards = N``): :mod:`streamrank.service.ray_shards`.

Replicas read the index files the ingress writes: a replica reopens an index when its manifest
changes (``IndexedStage._ensure_open``), so an acknowledged upsert is seen by every replica's next
search, and a replica that restarts loads the current files. A search whose replica died is sent
again to another replica (searches change nothing).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import ray
from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError

from streamrank.errors import IndexMismatchError
from streamrank.service.app import create_app
from streamrank.service.batching import BatchObserver, BatchPolicy, RunResult, ServiceUnavailable
from streamrank.service.metrics import Metrics
from streamrank.service.ray_settings import DeploymentSettings, RaySettings
from streamrank.service.settings import Settings
from streamrank.service.state import ServiceState
from streamrank.types import Ranking

log = logging.getLogger("streamrank.service.ray")

PASSED_ENV = (
    "STREAMRANK_HOME", "STREAMRANK_DATASETS", "STREAMRANK_MODELS", "STREAMRANK_OFFLINE", "HF_HUB_OFFLINE",
    "TRANSFORMERS_OFFLINE", "OMP_NUM_THREADS", "TOKENIZERS_PARALLELISM", "TRITON_INTERPRET",
    "RAY_SERVE_QUEUE_LENGTH_RESPONSE_DEADLINE_S",
)
"""Environment the driver hands to every replica and actor (models and data found the same way)."""
RETRIES = 2
"""Times a search or rerank is sent again when its replica died under it."""


@dataclass
class Reply:
    """What a pipeline replica answers for one request."""

    ranking: Ranking | None
    batch_size: int
    run_ms: float
    first: bool
    """The first request of its batch: the ingress records the batch's metrics once, from it."""
    error: Exception | None = None


def _largest(values: Sequence[float | None]) -> float | None:
    return None if any(v is None for v in values) else max(v for v in values if v is not None)


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


class PipelineReplica:
    """A replica of a pipeline deployment: the pipeline loaded, requests run in ``serve.batch`` batches.

    With ``rerankers`` (a handle of the ``rerank-<name>`` deployment) it runs the stages before
    ``split`` and the reranker deployment the rest."""

    def __init__(self, ref: str, settings: dict[str, Any], rerankers: Any = None, split: int | None = None) -> None:
        from streamrank.compose import load_pipeline
        from streamrank.service.ray_shards import install_shard_backend

        s = Settings.model_validate(settings)
        if s.torch_threads is not None:
            import torch

            torch.set_num_threads(s.torch_threads)
        install_shard_backend(s.ray or RaySettings(), s.torch_threads)
        self.pipeline = load_pipeline(ref, corpus=s.corpus, index_dir=s.index_dir)
        self.rerankers, self.split = rerankers, split
        self.policy = BatchPolicy.of(s)
        batch = serve.batch(
            max_batch_size=self.policy.max_batch,
            batch_wait_timeout_s=self.policy.window_s,
            max_concurrent_batches=self.policy.workers,
        )
        self._search = batch(self._run_batch)
        self._rerank = batch(self._run_batch)
        if s.warmup:
            warm_up(self.pipeline, slice(0, split) if rerankers is not None else None)

    async def search(self, ranking: Ranking, k: int | None, remaining_s: float | None) -> Reply:
        return await self._search((ranking, k, _deadline(remaining_s)))

    async def rerank(self, ranking: Ranking, k: int | None, remaining_s: float | None) -> Reply:
        return await self._rerank((ranking, k, _deadline(remaining_s)))

    def batch_bounds(self) -> dict[str, float]:
        """The bounds ``serve.batch`` runs with here (for tests and operators)."""
        return {
            "max_batch": self._search._get_max_batch_size(),  # type: ignore[attr-defined]
            "window_s": self._search._get_batch_wait_timeout_s(),  # type: ignore[attr-defined]
            "workers": self.policy.workers,
        }

    async def _run_batch(self, items: list[tuple[Ranking, int | None, float | None]]) -> list[Reply]:
        started = time.perf_counter()
        outcomes = await asyncio.to_thread(self._run, items)
        run_ms = (time.perf_counter() - started) * 1000.0
        return [
            Reply(
                ranking=None if isinstance(o, Exception) else o,
                batch_size=len(items),
                run_ms=run_ms,
                first=n == 0,
                error=o if isinstance(o, Exception) else None,
            )
            for n, o in enumerate(outcomes)
        ]

    def _run(self, items: list[tuple[Ranking, int | None, float | None]]) -> list[Ranking | Exception]:
        """One fused pipeline call; if it fails, each request alone (the culprit fails, the others not)."""
        k = _largest([i[1] for i in items])
        try:
            results = self._with_reload([i[0] for i in items], None if k is None else int(k), _largest([i[2] for i in items]))
        except Exception as exc:
            if len(items) == 1:
                return [exc]
            out: list[Ranking | Exception] = []
            for ranking, own_k, deadline in items:
                try:
                    out.append(self._with_reload([ranking], own_k, deadline)[0])
                except Exception as alone:  # returned to this request only
                    out.append(alone)
            return out
        return [r.top_k(i[1]) if i[1] is not None else r for r, i in zip(results, items, strict=True)]

    def _with_reload(self, rankings: list[Ranking], k: int | None, deadline: float | None) -> list[Ranking]:
        """The pipeline (or its first stage, then the reranker deployment) over ``rankings``."""
        if self.rerankers is None:
            return run_reloading(self.pipeline, rankings, k=k, deadline=deadline)
        first = run_reloading(self.pipeline, rankings, k=None, deadline=deadline, stages=slice(0, self.split))
        for attempt in range(RETRIES + 1):
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                return self.rerankers.run.remote(first, k, remaining).result()
            except (RayActorError, ActorUnavailableError) as exc:  # its replica died: another one gets it
                if attempt == RETRIES:
                    raise ServiceUnavailable(f"no replica of this pipeline's rerankers could answer: {exc}") from exc
                log.warning("a reranker replica failed under a batch (%s); sending it to another", type(exc).__name__)
        raise AssertionError("unreachable")


class RerankerReplica:
    """A replica of a ``rerank-<name>`` deployment: the pipeline's stages from ``split`` on, run on the
    batches the first-stage replicas formed (no second batching window)."""

    def __init__(self, ref: str, settings: dict[str, Any], split: int) -> None:
        from streamrank.compose import load_pipeline

        s = Settings.model_validate(settings)
        if s.torch_threads is not None:
            import torch

            torch.set_num_threads(s.torch_threads)
        self.pipeline = load_pipeline(ref, corpus=s.corpus, index_dir=s.index_dir)
        self.split = split
        if s.warmup:
            warm_up(self.pipeline, slice(split, None))

    def run(self, rankings: list[Ranking], k: int | None, remaining_s: float | None) -> list[Ranking]:
        stages = slice(self.split, None)
        return run_reloading(self.pipeline, rankings, k=k, deadline=_deadline(remaining_s), stages=stages)


def warm_up(pipeline: Any, stages: slice | None) -> None:
    """One tiny request through ``stages`` of the pipeline, so models are loaded before traffic comes."""
    from streamrank.pipeline import as_query, candidate_pool

    if pipeline.context.index_dir is not None and (stages is None or stages.start in (None, 0)):
        pipeline.run([Ranking(query=as_query("warm up"))], k=1, stages=stages)
    else:
        pipeline.run([candidate_pool("warm up", ["warm up"])], k=1, stages=stages)


def run_reloading(pipeline: Any, rankings: list[Ranking], **options: Any) -> list[Ranking]:
    """``Pipeline.run``; once more after a moment if an index was caught half rewritten by the ingress
    (its files change while this replica reopens them)."""
    try:
        return pipeline.run(rankings, **options)
    except IndexMismatchError as exc:
        if "inconsistent" not in str(exc):
            raise
        time.sleep(0.05)
        return pipeline.run(rankings, **options)


def _deadline(remaining_s: float | None) -> float | None:
    return None if remaining_s is None else time.monotonic() + remaining_s


class RayRunner:
    """Stands in for :class:`~streamrank.service.batching.PipelineRunner` in the ingress: one call to
    the pipeline deployment per request (the replicas batch)."""

    def __init__(self, handle: Any, kind: str, observer: BatchObserver | None) -> None:
        self.handle, self.kind, self.observer = handle, kind, observer

    async def run(self, ranking: Ranking, *, k: int | None, deadline: float | None) -> RunResult:
        started = time.monotonic()
        for attempt in range(RETRIES + 1):
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                reply: Reply = await getattr(self.handle, self.kind).remote(ranking, k, remaining)
                break
            except (RayActorError, ActorUnavailableError) as exc:
                if attempt == RETRIES:
                    raise ServiceUnavailable(f"no replica of this pipeline could answer: {exc}") from exc
                log.warning("a %s replica failed under a request (%s); sending it to another", self.kind, type(exc).__name__)
        if reply.error is not None:
            raise reply.error
        assert reply.ranking is not None
        if reply.first and self.observer is not None:
            self.observer(reply.batch_size, reply.ranking.timings_ms)
        queue_ms = max(0.0, (time.monotonic() - started) * 1000.0 - reply.run_ms)
        return RunResult(ranking=reply.ranking, batch_size=reply.batch_size, queue_ms=queue_ms)

    async def close(self) -> None:
        """Nothing to stop here: the replicas belong to Serve."""


class RayServiceState(ServiceState):
    """The ingress's state: pipelines loaded for the store and writes; searches and reranks sent to
    the pipeline deployments; ``/readyz`` also reports each deployment."""

    def __init__(self, settings: Settings, metrics: Metrics, *, handles: dict[str, Any], app_name: str) -> None:
        super().__init__(settings, metrics)
        self.handles, self.app_name = handles, app_name

    async def _load(self) -> None:
        await super()._load()
        if self.status != "ready":
            return
        local, remote = self._runners, {}
        for name, kind in local:
            remote[(name, kind)] = RayRunner(self.handles[name], kind, self.metrics.batch_observer(name, kind))
        self._runners = remote  # type: ignore[assignment]
        for runner in local.values():  # made by the base class, never used
            await runner.close()

    def readiness(self) -> dict[str, Any]:
        report = super().readiness()
        down, problems = deployment_problems(self.app_name)
        if down:
            raise ServiceUnavailable("; ".join(down))
        if problems:
            report["status"] = "degraded"
            report["problems"] = [*report["problems"], *problems]
        return report


def deployment_problems(app_name: str) -> tuple[list[str], list[str]]:
    """(pipeline deployments without a running replica, deployments not fully healthy) of the app."""
    app = serve.status().applications.get(app_name)
    if app is None:
        return [f"Serve application {app_name!r} is not running"], []
    down, problems = [], []
    for name, deployment in app.deployments.items():
        running = deployment.replica_states.get("RUNNING", 0)
        state = str(getattr(deployment.status, "value", deployment.status))
        if name.startswith(("pipeline-", "rerank-")) and running == 0:
            down.append(f"deployment {name!r} has no running replica ({state})")
        elif state != "HEALTHY":
            problems.append(f"deployment {name!r}: {state}, {running} replicas running ({deployment.message or 'no message'})")
    return down, problems


@serve.ingress()
class Ingress:
    """The ingress deployment: ``create_app`` with a :class:`RayServiceState`."""

    def __init__(self, settings: dict[str, Any], handles: dict[str, Any], app_name: str) -> None:
        from streamrank.service.ray_shards import install_shard_backend

        self.settings = Settings.model_validate(settings).model_copy(update={"warmup": False})
        install_shard_backend(self.settings.ray or RaySettings(), self.settings.torch_threads)
        self.handles, self.app_name = handles, app_name

    def __serve_build_asgi_app__(self) -> Any:
        state = partial(RayServiceState, handles=self.handles, app_name=self.app_name)
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
    """The bound Serve application: one deployment per pipeline, the ingress in front."""
    from streamrank.config import read_config
    from streamrank.errors import ConfigError

    settings = absolute_settings(settings)
    ray_settings = settings.ray or RaySettings()
    policy = BatchPolicy.of(settings)
    payload = settings.model_dump(mode="json")
    env = {"env_vars": {k: os.environ[k] for k in PASSED_ENV if k in os.environ}}
    logging_config = {"log_level": settings.log_level.upper(), "enable_access_log": False}  # the app logs and counts requests
    handles: dict[str, Any] = {}
    for ref in settings.pipelines:
        name = read_config(ref)[0].name
        if name in handles:
            raise ConfigError(f"two pipelines are named {name!r} ({ref}); give them distinct names")
        placement = ray_settings.deployment(name)
        options = deployment_options(f"pipeline-{name}", placement, policy, env, logging_config)
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
            own_options = deployment_options(f"rerank-{name}", placement.rerankers, policy, env, logging_config)
            rerankers = serve.deployment(RerankerReplica).options(**own_options).bind(ref, payload, split)
        handles[name] = serve.deployment(PipelineReplica).options(**options).bind(ref, payload, rerankers, split)
    ingress = serve.deployment(Ingress).options(
        name="ingress",
        num_replicas=1,
        max_ongoing_requests=10_000,  # async: it waits on the pipeline replicas, which bound the work
        ray_actor_options={"num_cpus": ray_settings.ingress_cpus, "runtime_env": env},
        logging_config=logging_config,
    )
    return ingress.bind(payload, handles, ray_settings.app_name)


def deployment_options(
    name: str, placement: DeploymentSettings, policy: BatchPolicy, env: dict[str, Any], logging_config: dict[str, Any]
) -> dict[str, Any]:
    """Serve options of one deployment: replicas (or autoscaling), CPUs/GPUs per replica, queue bound."""
    options: dict[str, Any] = {
        "name": name,
        "ray_actor_options": {"num_cpus": placement.num_cpus, "num_gpus": placement.num_gpus, "runtime_env": env},
        "max_ongoing_requests": placement.max_ongoing_requests or max(64, 8 * policy.max_batch * policy.workers),
        "logging_config": logging_config,
    }
    if placement.autoscaling is not None:
        options["autoscaling_config"] = placement.autoscaling.model_dump()
    else:
        options["num_replicas"] = placement.replicas
    return options


def start_ray(ray_settings: RaySettings, **init: Any) -> None:
    """Join the cluster at ``address``, or start a local head (127.0.0.1, no dashboard)."""
    os.environ.setdefault("RAY_SERVE_QUEUE_LENGTH_RESPONSE_DEADLINE_S", "1.0")  # loaded CPUs answer slowly
    if ray.is_initialized():
        return
    options: dict[str, Any] = {"namespace": ray_settings.namespace, "include_dashboard": False}
    if ray_settings.address:
        options["address"] = ray_settings.address
    else:
        options["_node_ip_address"] = "127.0.0.1"
    options["runtime_env"] = {"env_vars": {k: os.environ[k] for k in PASSED_ENV if k in os.environ}}
    ray.init(**{**options, **init})


def deploy(settings: Settings) -> str:
    """Start Serve on ``host:port`` and deploy the application; returns its URL."""
    settings = absolute_settings(settings)
    ray_settings = settings.ray or RaySettings()
    start_ray(ray_settings)
    for attempt in (1, 2):
        try:
            serve.start(http_options={"host": settings.host, "port": settings.port})
            break
        except RayActorError:  # the HTTP proxy died while starting (seen on a saturated machine)
            if attempt == 2:
                raise
            log.warning("Ray Serve's HTTP proxy died while starting; shutting Serve down and starting it again")
            serve.shutdown()
    serve.run(build_application(settings), name=ray_settings.app_name, route_prefix="/", blocking=False)
    return f"http://{settings.host}:{settings.port}"


def undeploy(settings: Settings) -> None:
    """Delete the application and its shard actors (the cluster stays up)."""
    from streamrank.service.ray_shards import stop_shard_actors

    ray_settings = settings.ray or RaySettings()
    serve.delete(ray_settings.app_name)
    stop_shard_actors(ray_settings.namespace)


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
