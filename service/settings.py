"""Service settings: defaults, then a TOML file, then ``STREAMRANK_*`` environment variables, then arguments.

The file is named by ``--config`` or ``STREAMRANK_SERVICE_CONFIG`` and holds the same keys as
:class:`Settings`, flat::

    host = "0.0.0.0"
    port = 8080
    pipelines = ["configs/bm25.toml", "configs/hybrid.toml"]
    batch_window_ms = 5
    deadline_ms = 2000

Every key can also be set as ``STREAMRANK_<KEY>`` (``STREAMRANK_PORT=8080``,
``STREAMRANK_PIPELINES=bm25,hybrid``, ``STREAMRANK_BATCHING=false``, ``STREAMRANK_API_KEY=...``).
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from streamrank.config import describe_validation_error
from streamrank.errors import ConfigError
from streamrank.service.ray_settings import RaySettings

ENV_PREFIX = "STREAMRANK_"
CONFIG_ENV = "STREAMRANK_SERVICE_CONFIG"


class Settings(BaseModel):
    """Everything the HTTP service can be told. Limits are enforced per request with a 413/422."""

    model_config = ConfigDict(extra="forbid")

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    pipelines: list[str] = Field(default_factory=lambda: ["hybrid"], min_length=1)
    """Pipeline files (paths, or names in configs/) to load; each is served under its `name`."""
    default_pipeline: str | None = None
    """Pipeline used when a request names none (default: the first one loaded)."""
    corpus: str | None = None
    """Override the corpus of every pipeline (dataset name or BEIR folder)."""
    index_dir: str | None = None
    """Override the index folder of every pipeline."""
    api_key: str | None = Field(None, repr=False)
    """When set, every endpoint but /healthz, /, /docs needs `Authorization: Bearer <key>` or `X-API-Key`.
    An empty or blank key is an error (it would silently turn auth off)."""

    max_body_bytes: int = Field(2 * 1024 * 1024, ge=1)
    max_query_chars: int = Field(2048, ge=1)
    max_k: int = Field(1000, ge=1)
    max_rerank_documents: int = Field(1000, ge=1)
    max_upsert_documents: int = Field(1000, ge=1)
    max_id_bytes: int = Field(512, ge=1)
    """Longest document id, in UTF-8 bytes (Lucene refuses an id term over 32,766 bytes)."""
    max_document_chars: int = Field(1_000_000, ge=1)
    """Longest document (title + text), in characters."""

    allowed_origins: list[str] = Field(default_factory=list)
    """Browser origins (`https://app.example`) besides the service's own that may send writes; any
    other `Origin` on a POST/PUT/PATCH/DELETE is a 403."""
    json_without_content_type: bool = True
    """Read a body sent without a JSON content type (`curl -d '{...}'`) as JSON; browsers (requests
    carrying `Origin` or `Sec-Fetch-*`) must always send `Content-Type: application/json`."""

    shutdown_timeout_s: float = Field(30.0, gt=0)
    """On SIGTERM/SIGINT: how long in-flight requests may take to finish before they are cut."""
    header_timeout_s: float = Field(10.0, gt=0)
    """A connection whose request headers have not all arrived after this long is closed."""

    batching: bool = True
    """Fuse concurrent requests to one pipeline into one batched pipeline call."""
    batch_window_ms: float = Field(5.0, ge=0)
    """How long the first request of a batch waits for company (bounded extra latency)."""
    max_batch_size: int = Field(32, ge=1)
    workers: int = Field(2, ge=1)
    """Pipeline calls in flight per pipeline and request kind (search, rerank): batches with batching
    on, single requests with it off."""
    deadline_ms: float | None = Field(None, gt=0)
    """Default per-request deadline; a stage still running then is cut and the earlier ranking returned."""

    recover: bool = True
    """At startup, re-add documents the store holds but an index lacks (after a crash)."""
    warmup: bool = True
    """Run one query per pipeline before reporting ready, so models and indexes are loaded."""
    torch_threads: int | None = Field(None, ge=1)
    log_level: str = "info"
    ray: RaySettings | None = None
    """Serve on Ray Serve (``streamrank serve --ray``): cluster, replicas, CPUs/GPUs per replica
    (``streamrank.service.ray_settings``). None: in process, and Ray is never imported."""

    @field_validator("api_key")
    @classmethod
    def _key_not_blank(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("is empty: unset STREAMRANK_API_KEY (or api_key) to run without a key")
        return value


def _env_values(env: Mapping[str, str]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for name, field in Settings.model_fields.items():
        raw = env.get(ENV_PREFIX + name.upper())
        if raw is None:
            continue
        if raw == "" and not field.is_required() and field.default is None and name != "api_key":
            values[name] = None
        elif name in ("pipelines", "allowed_origins"):
            values[name] = [p.strip() for p in raw.split(",") if p.strip()]
        else:
            values[name] = raw
    return values


def load_settings(
    config: str | Path | None = None,
    *,
    env: Mapping[str, str] | None = None,
    **overrides: Any,
) -> Settings:
    """Merge defaults < TOML file < environment < ``overrides`` (None values are ignored).

    Raises ConfigError naming the file, variable or key that is wrong.
    """
    env = os.environ if env is None else env
    path = config if config is not None else env.get(CONFIG_ENV)
    merged: dict[str, Any] = {}
    where = "service settings"
    if path:
        source = Path(path).expanduser()
        try:
            merged.update(tomllib.loads(source.read_text()))
        except FileNotFoundError:
            raise ConfigError(f"service config {str(source)!r} not found") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{source}: not valid TOML: {exc}") from exc
        where = f"{source} (or {ENV_PREFIX}* environment)"
    merged.update(_env_values(env))
    merged.update({key: value for key, value in overrides.items() if value is not None})
    try:
        return Settings.model_validate(merged)
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(exc, where)) from None
