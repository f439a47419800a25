"""The HTTP service: search, Cohere/Jina-compatible rerank, document writes, health, metrics, a search page.

    from streamrank.service.app import create_app
    from streamrank.service.settings import load_settings
    app = create_app(load_settings(pipelines=["configs/bm25.toml"]))

or ``streamrank serve -p configs/bm25.toml``. Every response carries ``X-Request-ID`` (the client's,
when it sent a sane one) and JSON bodies repeat it as ``request_id``.

This module is the app factory; the parts live in ``routes`` (endpoints), ``dependencies`` (state,
API key, limits, deadlines), ``middleware`` (request id, security headers, cross-site and auth
checks, body limit, metrics), ``errors`` (exception -> HTTP answer), ``openapi`` (the limits in
``/openapi.json``), ``pages`` (the search page and ``/docs``) and ``server`` (uvicorn: graceful
shutdown, slow-header timeout).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI

from streamrank.service.errors import install_error_handlers
from streamrank.service.metrics import Metrics
from streamrank.service.middleware import RequestContextMiddleware
from streamrank.service.openapi import openapi_with_limits
from streamrank.service.pages import install_docs, is_open
from streamrank.service.routes import api, open_routes
from streamrank.service.schemas import ErrorResponse
from streamrank.service.settings import Settings, load_settings
from streamrank.service.state import ServiceState


def create_app(
    settings: Settings | None = None, *, state_class: Callable[[Settings, Metrics], ServiceState] = ServiceState
) -> FastAPI:
    """The FastAPI app for ``settings`` (default: from the config file and environment).

    ``state_class`` makes the state that runs the pipelines (the Ray back end passes one that sends
    them to its deployments; ``streamrank.service.ray_serve``).
    """
    settings = settings or load_settings()
    metrics = Metrics()
    state = state_class(settings, metrics)

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
        docs_url=None,  # served by install_docs from packaged swagger-ui files
        redoc_url=None,
    )
    app.router.redirect_slashes = False  # a redirect would echo the client's Host header back
    app.state.service = state
    app.state.metrics = metrics
    app.add_middleware(RequestContextMiddleware, settings=settings, metrics=metrics, is_open=is_open)
    install_error_handlers(app)
    app.include_router(open_routes)
    app.include_router(api)
    install_docs(app, "StreamRank")
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
    """Run the service with uvicorn. Arguments override the config file and ``STREAMRANK_*`` variables.

    SIGTERM or SIGINT stops it gracefully: no new connections, in-flight requests finish (at most
    ``shutdown_timeout_s``), indexes and the store are closed, and the process exits with status 0.
    """
    from streamrank.service.server import run_server

    settings = load_settings(config, pipelines=pipelines, host=host, port=port, corpus=corpus, index_dir=index_dir)
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    run_server(create_app(settings), settings)
