"""The HTTP service: search, Cohere/Jina-compatible rerank, document writes, health, metrics, a search page.

    from streamrank.service.app import create_app
    from streamrank.service.settings import load_settings
    app = create_app(load_settings(pipelines=["configs/bm25.toml"]))

or ``streamrank serve -p configs/bm25.toml``. Every response carries ``X-Request-ID`` (the client's,
when it sent a sane one) and JSON bodies repeat it as ``request_id``.
"""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
import time
import uuid
from collections.abc import Callable, Sequence
from contextlib import asynccontextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from starlette.datastructures import Headers, MutableHeaders
from starlette.exceptions import HTTPException
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from streamrank.errors import (
    DatasetNotFoundError,
    IndexMissingError,
    InvalidQueryError,
    StreamRankError,
)
from streamrank.pipeline import as_query, candidate_pool
from streamrank.serialize import ranking_to_dict
from streamrank.service.metrics import Metrics
from streamrank.service.schemas import (
    DeleteResponse,
    DocumentOut,
    ErrorResponse,
    PipelineInfo,
    PipelinesResponse,
    RerankDocument,
    RerankRequest,
    RerankResponse,
    SearchRequest,
    SearchResponse,
    StageInfo,
    StatusResponse,
    UpsertRequest,
    UpsertResponse,
)
from streamrank.service.settings import Settings, load_settings
from streamrank.service.state import ServiceState, ServiceUnavailable, UnknownPipeline
from streamrank.types import Document, Query, Ranking

log = logging.getLogger("streamrank.service")

STATIC = Path(__file__).resolve().parent / "static"
REQUEST_ID: ContextVar[str] = ContextVar("request_id", default="-")
_SANE_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")

ERROR_STATUS: dict[type[StreamRankError], int] = {
    InvalidQueryError: 422,
    IndexMissingError: 404,
    DatasetNotFoundError: 404,
}
"""StreamRankError subclasses that are not a plain 400."""

ERROR_ANSWERS: dict[int, str] = {
    400: "The pipeline rejected the request",
    401: "Missing or wrong API key (only when the service has one)",
    404: "Unknown pipeline, document, index or dataset",
    413: "The body is larger than `max_body_bytes`",
    503: "Pipelines are still loading or failed to load (`Retry-After` says when to retry)",
}


def documented_errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` for the error answers a route can give (all shaped as ErrorResponse)."""
    return {code: {"model": ErrorResponse, "description": ERROR_ANSWERS[code]} for code in codes}


def request_id() -> str:
    """The id of the request being handled."""
    return REQUEST_ID.get()


def error_body(status: int, message: str, kind: str, errors: list[dict[str, Any]] | None = None) -> JSONResponse:
    body = ErrorResponse(message=message, type=kind, request_id=request_id(), errors=errors)
    return JSONResponse(body.model_dump(exclude_none=True), status_code=status)


class BodyTooLarge(HTTPException):
    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body is larger than the limit of {limit} bytes (max_body_bytes)")


def _not_json(content_type: str | None) -> bool:
    """True for a missing content type or curl's default form type (not multipart uploads)."""
    return content_type is None or content_type.split(";")[0].strip() in ("", "application/x-www-form-urlencoded")


class RequestContextMiddleware:
    """Request id, body-size limit, request metrics, and a JSON 500 for anything unhandled."""

    def __init__(self, app: ASGIApp, *, max_body_bytes: int, metrics: Metrics) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        headers = Headers(scope=scope)
        client_id = headers.get("x-request-id", "")
        rid = client_id if _SANE_ID.fullmatch(client_id) else uuid.uuid4().hex
        token = REQUEST_ID.set(rid)
        scope.setdefault("state", {})["started"] = time.monotonic()
        status, response_started, received = 500, False, 0
        if scope["method"] in ("POST", "PUT") and _not_json(headers.get("content-type")):
            # Every body this API takes is JSON: `curl -d '{...}'` (form content type) must just work.
            scope["headers"] = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
            scope["headers"].append((b"content-type", b"application/json"))

        async def send_with_id(message: Message) -> None:
            nonlocal status, response_started
            if message["type"] == "http.response.start":
                response_started, status = True, message["status"]
                MutableHeaders(scope=message)["X-Request-ID"] = rid
            await send(message)

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_body_bytes:
                raise BodyTooLarge(self.max_body_bytes)
            return message

        try:
            length = headers.get("content-length", "")
            if length.isdigit() and int(length) > self.max_body_bytes:
                error = BodyTooLarge(self.max_body_bytes)
                await error_body(413, error.detail, "body_too_large")(scope, receive, send_with_id)
            else:
                await self.app(scope, limited_receive, send_with_id)
        except Exception:
            log.exception("unhandled error in %s %s (request %s)", scope["method"], scope["path"], rid)
            if response_started:
                raise
            await error_body(500, "internal error; quote the request id when reporting it", "internal_error")(
                scope, receive, send_with_id
            )
        finally:
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            self.metrics.observe_request(scope["method"], route, status, time.perf_counter() - started)
            REQUEST_ID.reset(token)


# ---- dependencies ------------------------------------------------------------------------------
def get_state(request: Request) -> ServiceState:
    return request.app.state.service


def get_settings(request: Request) -> Settings:
    return request.app.state.service.settings


State = Annotated[ServiceState, Depends(get_state)]

_bearer = HTTPBearer(auto_error=False, description="`Authorization: Bearer <STREAMRANK_API_KEY>`")
_api_key = APIKeyHeader(name="X-API-Key", auto_error=False, description="The service's STREAMRANK_API_KEY")


def require_api_key(
    request: Request,
    bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    api_key: Annotated[str | None, Depends(_api_key)],
) -> None:
    """401 unless the service has no key or the request presents it (Bearer or X-API-Key)."""
    expected = get_settings(request).api_key
    if not expected:
        return
    offered = bearer.credentials if bearer is not None else api_key
    if offered is None or not secrets.compare_digest(offered.encode(), expected.encode()):
        raise HTTPException(
            401, "missing or wrong API key: send `Authorization: Bearer <key>` or `X-API-Key: <key>`",
            headers={"WWW-Authenticate": "Bearer"},
        )


def check_limit(what: str, value: int, setting: str, limit: int) -> None:
    if value > limit:
        raise HTTPException(422, f"{what} is {value}; the limit is {limit} ({setting})")


def deadline_of(request: Request, deadline_ms: float | None) -> float | None:
    """Absolute deadline (``time.monotonic()``) from the request's own budget or the default."""
    budget = deadline_ms if deadline_ms is not None else get_settings(request).deadline_ms
    return None if budget is None else request.scope["state"]["started"] + budget / 1000.0


def check_query(settings: Settings, text: str) -> None:
    check_limit("the query length (characters)", len(text), "max_query_chars", settings.max_query_chars)


# ---- routes ------------------------------------------------------------------------------------
open_routes = APIRouter()
api = APIRouter(dependencies=[Depends(require_api_key)], responses=documented_errors(401))
PIPELINE_ERRORS = documented_errors(400, 404, 503)
"""What any route that runs a pipeline may answer besides 200, 401 and 422."""
BODY_ERRORS = {**PIPELINE_ERRORS, **documented_errors(413)}


@open_routes.get("/", include_in_schema=False)
async def search_page() -> FileResponse:
    return FileResponse(STATIC / "index.html", media_type="text/html")


@open_routes.get("/healthz", response_model=StatusResponse, tags=["service"])
async def healthz() -> StatusResponse:
    """Liveness: the process answers (pipelines may still be loading)."""
    return StatusResponse(status="ok", request_id=request_id())


@api.get("/readyz", response_model=StatusResponse, responses={503: {"model": StatusResponse}}, tags=["service"])
async def readyz(state: State) -> Any:
    """Readiness: 200 once every pipeline is loaded, its indexes open and models warm; 503 before."""
    try:
        state.require_ready()
    except ServiceUnavailable as exc:
        body = StatusResponse(status=state.status, message=str(exc), request_id=request_id())
        return JSONResponse(body.model_dump(), status_code=503)
    return StatusResponse(
        status="ready", pipelines=list(state.pipelines), recovered=state.recovered, request_id=request_id()
    )


@api.get("/metrics", tags=["service"], response_class=Response)
async def metrics(request: Request) -> Response:
    """Prometheus text format: requests, errors, latency per route and stage, batch sizes."""
    m: Metrics = request.app.state.metrics
    return Response(m.render(), media_type=m.content_type)


@api.get("/pipelines", response_model=PipelinesResponse, responses=documented_errors(503), tags=["service"])
async def pipelines(state: State) -> PipelinesResponse:
    """The pipelines this service serves (their names go in `pipeline` / `model`)."""
    state.require_ready()
    infos = [
        PipelineInfo(
            name=p.name,
            description=p.description,
            default=p.name == state.default,
            stages=[StageInfo(name=s.name, kind=s.config.kind) for s in p.stages],
            source=str(p.source) if p.source else None,
            corpus=p.context.corpus,
            index_dir=str(p.context.index_dir) if p.context.index_dir else None,
        )
        for p in state.pipelines.values()
    ]
    return PipelinesResponse(pipelines=infos, request_id=request_id())


@api.post("/search", response_model=SearchResponse, responses=BODY_ERRORS, tags=["ranking"])
async def search(body: SearchRequest, request: Request, state: State) -> dict[str, Any]:
    """Rank the corpus for one query; results carry every stage's score, the answer each stage's time."""
    settings = state.settings
    check_query(settings, body.query)
    check_limit("k", body.k, "max_k", settings.max_k)
    pipeline = state.pipeline(body.pipeline)
    query = as_query(Query(id=request_id(), text=body.query, user_history=tuple(body.user_history)))
    result = await state.run(
        pipeline, "search", Ranking(query=query), k=body.k, deadline=deadline_of(request, body.deadline_ms)
    )
    return {
        **ranking_to_dict(result.ranking),
        "pipeline": pipeline.name,
        "batch_size": result.batch_size,
        "queue_ms": result.queue_ms,
        "total_ms": (time.monotonic() - request.scope["state"]["started"]) * 1000.0,
        "request_id": request_id(),
    }


def _documents_for_rerank(items: Sequence[str | RerankDocument]) -> list[Document]:
    return [
        Document(id=str(i), text=item) if isinstance(item, str) else Document(id=str(i), text=item.text, title=item.title)
        for i, item in enumerate(items)
    ]


@api.post("/v1/rerank", response_model=RerankResponse, response_model_exclude_none=True, responses=BODY_ERRORS, tags=["ranking"])
@api.post("/v2/rerank", response_model=RerankResponse, response_model_exclude_none=True, responses=BODY_ERRORS, tags=["ranking"])
async def rerank(body: RerankRequest, request: Request, state: State) -> RerankResponse:
    """Cohere/Jina-compatible reranking of supplied documents with the pipeline named by `model`.

    `relevance_score` is the pipeline's final score: higher is better, but it is not a calibrated
    probability. `results` are best first, at most `top_n`; `document` only with `return_documents`.
    """
    settings = state.settings
    check_query(settings, body.query)
    check_limit("the number of documents", len(body.documents), "max_rerank_documents", settings.max_rerank_documents)
    pipeline = state.pipeline(body.model)
    docs = _documents_for_rerank(body.documents)
    pool = candidate_pool(Query(id=request_id(), text=body.query), docs)
    result = await state.run(pipeline, "rerank", pool, k=body.top_n, deadline=deadline_of(request, body.deadline_ms))
    ranking = result.ranking
    results = [
        {
            "index": int(c.doc_id),
            "relevance_score": c.score,
            "document": {"text": docs[int(c.doc_id)].text} if body.return_documents else None,
        }
        for c in ranking.candidates
    ]
    tokens = sum(call.prompt_tokens + call.output_tokens for call in ranking.calls)
    return RerankResponse.model_validate(
        {
            "id": request_id(),
            "model": pipeline.name,
            "results": results,
            "meta": {"api_version": {"version": "2"}, "billed_units": {"search_units": 1}},
            "usage": {"total_tokens": tokens},
            "degraded": ranking.degraded,
            "notes": ranking.notes,
            "timings_ms": ranking.timings_ms,
            "request_id": request_id(),
        }
    )


@api.post("/documents", response_model=UpsertResponse, responses=BODY_ERRORS, tags=["documents"])
async def upsert_documents(body: UpsertRequest, state: State) -> UpsertResponse:
    """Insert or replace documents by id. Answered only once they are durable (fsynced) and indexed."""
    check_limit("the number of documents", len(body.documents), "max_upsert_documents", state.settings.max_upsert_documents)
    pipeline = state.pipeline(body.pipeline)
    docs = [Document(id=d.id, text=d.text, title=d.title) for d in body.documents]
    await asyncio.to_thread(state.upsert, pipeline, docs)
    return UpsertResponse(upserted=len(docs), ids=[d.id for d in docs], request_id=request_id())


@api.get("/documents/{doc_id:path}", response_model=DocumentOut, responses=PIPELINE_ERRORS, tags=["documents"])
async def get_document(doc_id: str, state: State, pipeline: str | None = None) -> DocumentOut:
    """One stored document."""
    doc = await asyncio.to_thread(state.get, state.pipeline(pipeline), doc_id)
    if doc is None:
        raise HTTPException(404, f"no document with id {doc_id!r}")
    return DocumentOut(id=doc.id, title=doc.title, text=doc.text, request_id=request_id())


@api.delete("/documents/{doc_id:path}", response_model=DeleteResponse, responses=PIPELINE_ERRORS, tags=["documents"])
async def delete_document(doc_id: str, state: State, pipeline: str | None = None) -> DeleteResponse:
    """Remove a document from every index and the store (404 when it is not stored)."""
    if not await asyncio.to_thread(state.delete, state.pipeline(pipeline), doc_id):
        raise HTTPException(404, f"no document with id {doc_id!r}")
    return DeleteResponse(deleted=doc_id, request_id=request_id())


# ---- error handlers ------------------------------------------------------------------------------
def _validation_message(errors: Sequence[dict[str, Any]]) -> str:
    parts = []
    for err in errors:
        where = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "body"
        if err.get("type") == "json_invalid":
            parts.append(f"the body is not valid JSON ({err.get('ctx', {}).get('error', 'decode error')})")
        elif err.get("type") == "model_attributes_type" and where == "body":
            parts.append("the body must be a JSON object sent with `Content-Type: application/json`")
        else:
            parts.append(f"{where}: {err.get('msg')}")
    return "invalid request: " + "; ".join(parts)


async def _on_validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = [{k: v for k, v in e.items() if k not in ("input", "url")} for e in exc.errors()]
    return error_body(422, _validation_message(errors), "validation_error", jsonable_encoder(errors))


async def _on_http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 400 and isinstance(exc.__cause__, UnicodeDecodeError):  # FastAPI's "error parsing the body"
        return error_body(422, f"invalid request: the body is not valid JSON ({exc.__cause__.reason})", "validation_error")
    response = error_body(exc.status_code, str(exc.detail), "http_error")
    response.headers.update(exc.headers or {})
    if exc.status_code == 405:
        response.headers["Allow"] = ", ".join(_allowed_methods(request))
    return response


HTTP_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


def _allowed_methods(request: Request) -> list[str]:
    """Every method some route serves at the request's path (Starlette names only the first route's)."""
    return [
        method
        for method in HTTP_METHODS
        if any(route.matches({**request.scope, "method": method})[0] is Match.FULL for route in request.app.router.routes)
    ]


async def _on_streamrank_error(request: Request, exc: Exception) -> JSONResponse:
    status = next((code for cls, code in ERROR_STATUS.items() if isinstance(exc, cls)), 400)
    return error_body(status, str(exc), type(exc).__name__)


async def _on_unavailable(request: Request, exc: Exception) -> JSONResponse:
    response = error_body(503, str(exc), "unavailable")
    response.headers["Retry-After"] = "1"
    return response


async def _on_unknown_pipeline(request: Request, exc: Exception) -> JSONResponse:
    return error_body(404, str(exc), "unknown_pipeline")


# ---- factory -----------------------------------------------------------------------------------
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
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(HTTPException, _on_http_error)
    app.add_exception_handler(StreamRankError, _on_streamrank_error)
    app.add_exception_handler(ServiceUnavailable, _on_unavailable)
    app.add_exception_handler(UnknownPipeline, _on_unknown_pipeline)
    app.include_router(open_routes)
    app.include_router(api)
    app.openapi = _openapi_with_limits(app, settings)  # type: ignore[method-assign]
    return app


REQUEST_LIMITS: dict[tuple[str, str], tuple[str, str]] = {
    ("SearchRequest", "query"): ("maxLength", "max_query_chars"),
    ("SearchRequest", "k"): ("maximum", "max_k"),
    ("RerankRequest", "query"): ("maxLength", "max_query_chars"),
    ("RerankRequest", "documents"): ("maxItems", "max_rerank_documents"),
    ("UpsertRequest", "documents"): ("maxItems", "max_upsert_documents"),
}
"""(schema, field) -> (JSON Schema keyword, setting): the per-service limits, shown in /openapi.json."""


def _openapi_with_limits(app: FastAPI, settings: Settings) -> Callable[[], dict[str, Any]]:
    """``app.openapi`` with this service's request limits written into the request schemas.

    The limits are settings, not constants of the models, so FastAPI cannot see them; the routes
    still check them (a 422 naming the setting).
    """
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        fresh = app.openapi_schema is None
        schema = generate()
        if fresh:
            components = schema["components"]["schemas"]
            for (model, field), (keyword, setting) in REQUEST_LIMITS.items():
                prop = components[model]["properties"][field]
                prop[keyword] = getattr(settings, setting)
                prop["description"] = f"{prop.get('description', '')} At most {prop[keyword]} (`{setting}`).".strip()
        return schema

    return openapi


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
