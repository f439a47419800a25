"""The HTTP service: search, Cohere/Jina-compatible rerank, document writes, health, metrics, a search page.

    from streamrank.service.app import create_app
    from streamrank.service.settings import load_settings
    app = create_app(load_settings(pipelines=["configs/bm25.toml"]))

or ``streamrank serve -p configs/bm25.toml``. Every response carries ``X-Request-ID`` (the client's,
when it sent a sane one) and JSON bodies repeat it as ``request_id``.

This module is the app factory; the parts live in ``routes`` (endpoints), ``dependencies`` (state,
API key, limits, deadlines), ``middleware`` (request id, body limit, metrics), ``errors`` (exception
-> HTTP answer) and ``openapi`` (the limits in ``/openapi.json``).
"""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI

from streamrank.service.errors import install_error_handlers
from streamrank.service.metrics import Metrics
from streamrank.service.middleware import RequestContextMiddleware
from streamrank.service.openapi import openapi_with_limits
from streamrank.service.routes import api, open_routes
from streamrank.service.schemas import ErrorResponse
from streamrank.service.settings import Settings, load_settings
from streamrank.service.state import ServiceState


def create_app(settings: Settings | None = None) -> FastAPI:
    """The FastAPI app for ``settings`` (default: from the config file and environment)."""
    settings = settings or load_settings()
    metrics = Metrics()
    state = ServiceState(settings, metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await state.start()
        try:
            yield
        finally:
            await state.close()

    app = FastAPI(
        title="StreamRank",
        description="Retrieval and reranking pipelines over HTTP. The search page is at `/`.",
        version=_version(),
        lifespan=lifespan,
        responses={422: {"model": ErrorResponse}},
    )
    app.state.service = state
    app.state.metrics = metrics
    app.add_middleware(RequestContextMiddleware, max_body_bytes=settings.max_body_bytes, metrics=metrics)
    install_error_handlers(app)
    app.include_router(open_routes)
    app.include_router(api)
    app.openapi = openapi_with_limits(app, settings)  # type: ignore[method-assign]
    return app


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("streamrank")
    except PackageNotFoundError:
        return "0"


def serve(
    pipelines: list[str] | None = None,
    host: str | None = None,
    port: int | None = None,
    corpus: str | None = None,
    index_dir: str | None = None,
    config: str | Path | None = None,
) -> None:
    """Run the service with uvicorn. Arguments override the config file and ``STREAMRANK_*`` variables."""
    import uvicorn

    settings = load_settings(config, pipelines=pipelines, host=host, port=port, corpus=corpus, index_dir=index_dir)
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level=settings.log_level)
