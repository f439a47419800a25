"""Settings of the Ray back end (``ray = {...}`` in the service settings file); importing this module
never imports Ray.

    # service.toml
    pipelines = ["configs/dense.toml", "experiments/first.toml"]
    batch_window_ms = 5          # the batching bounds are the service's own, for both back ends
    max_batch_size = 32
    [ray]
    address = "auto"             # join a running cluster (default: start a local head)
    replicas = 2                 # per pipeline deployment, unless a pipeline says otherwise
    num_cpus = 1
    ingress = {autoscaling = {min_replicas = 2, max_replicas = 4}}   # stateless HTTP front
    shard = {replicas = 2, resources = {shard_host = 1}, max_replicas_per_node = 1}
    [ray.pipelines.first]        # the LLM reranking pipeline: 2 CPU retrieval replicas ...
    replicas = 2
    rerankers = {replicas = 1, num_gpus = 1}   # ... in front of one GPU reranker replica

The environment form is JSON: ``STREAMRANK_RAY='{"replicas": 2}'``.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Autoscaling(BaseModel):
    """Ray Serve autoscaling bounds of a deployment (replaces a fixed ``replicas``)."""

    model_config = ConfigDict(extra="forbid")

    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(2, ge=1)
    target_ongoing_requests: float = Field(16.0, gt=0)
    """Requests in flight per replica that the autoscaler aims for."""

    @model_validator(mode="after")
    def _bounds(self) -> Autoscaling:
        if self.max_replicas < self.min_replicas:
            raise ValueError(f"max_replicas ({self.max_replicas}) is below min_replicas ({self.min_replicas})")
        return self


class DeploymentSettings(BaseModel):
    """Placement of one pipeline deployment: replicas and what each replica reserves."""

    model_config = ConfigDict(extra="forbid")

    replicas: int = Field(1, ge=1)
    num_cpus: float = Field(1.0, ge=0)
    """CPUs reserved per replica (Ray's scheduling unit; torch threads follow ``torch_threads``)."""
    num_gpus: float = Field(0.0, ge=0)
    """GPUs per replica: 1 puts each replica on its own GPU, 0.5 packs two on one."""
    autoscaling: Autoscaling | None = None
    resources: dict[str, float] = Field(default_factory=dict)
    """Custom Ray resources per replica (``{shard_host = 1}``: only on nodes started with that resource)."""
    max_replicas_per_node: int | None = Field(None, ge=1)
    """Spread replicas over nodes (1: never two replicas of this deployment on one node)."""
    max_ongoing_requests: int | None = Field(None, ge=1)
    """Requests a replica holds at once (queued for ``serve.batch`` or running); default 8 full batches
    per worker, at least 64. Serve's router backs off from a full replica, so a small bound keeps
    batches small: with 32 it formed batches of 1-2 at 32 clients, with 256 batches of 10-20."""
    rerankers: DeploymentSettings | None = None
    """Run the pipeline's rerankers (its stages from the first reranker on) in a deployment of their
    own, ``rerank-<name>``, with this placement: the ``pipeline-<name>`` replicas run the first stage
    and hand each batch on through a deployment handle, so the two scale apart (a GPU reranker with
    one replica behind several CPU retrieval replicas). None: the whole pipeline in one deployment."""


class RaySettings(DeploymentSettings):
    """How ``streamrank serve --ray`` deploys: the cluster, the ingress, each pipeline, the shards."""

    address: str | None = None
    """Cluster to join (``auto``, ``ip:port``); None starts a local head on this machine."""
    namespace: str = "streamrank"
    app_name: str = "streamrank"
    ingress: DeploymentSettings = Field(default_factory=lambda: DeploymentSettings(num_cpus=0.25))
    """The HTTP front (``ingress``): stateless, any number of replicas or autoscaling."""
    writer: DeploymentSettings = Field(default_factory=lambda: DeploymentSettings(num_cpus=0.25))
    """The ``writer`` deployment (the store and every write); always one replica."""
    shard: DeploymentSettings = Field(default_factory=lambda: DeploymentSettings(num_cpus=0.25))
    """Each ``shard-<pipeline>-<i>`` deployment (pipelines with ``shards = N``)."""
    call_timeout_s: float = Field(30.0, gt=0)
    """How long a call to another deployment may take (queueing included) before the request gets a 503."""
    pipelines: dict[str, DeploymentSettings] = Field(default_factory=dict)
    """Per pipeline name: its own placement (keys not given come from the top level)."""

    @model_validator(mode="after")
    def _one_writer(self) -> RaySettings:
        if self.writer.replicas != 1 or self.writer.autoscaling is not None:
            raise ValueError("ray.writer: the writer owns the document store and runs as exactly one replica")
        return self

    @model_validator(mode="before")
    @classmethod
    def _from_json(cls, value: Any) -> Any:
        if isinstance(value, str):  # STREAMRANK_RAY='{"replicas": 2}'
            return json.loads(value) if value.strip() else {}
        return value

    def deployment(self, pipeline: str) -> DeploymentSettings:
        """The placement of ``pipeline``: its own table over the top-level values."""
        base = {name: getattr(self, name) for name in DeploymentSettings.model_fields}
        own = self.pipelines.get(pipeline)
        if own is not None:
            base.update({name: getattr(own, name) for name in own.model_fields_set})
        return DeploymentSettings.model_validate(base)
