"""The endpoints: the search page, health, readiness, metrics, pipelines, search, rerank and documents.

``open_routes`` answer without an API key; ``api`` routes require it when the service has one.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.exceptions import HTTPException

from streamrank.pipeline import as_query, candidate_pool, show_id
from streamrank.serialize import ranking_to_dict
from streamrank.service.context import request_id
from streamrank.service.dependencies import State, check_limit, check_query, deadline_of, require_api_key
from streamrank.service.errors import documented_errors
from streamrank.service.metrics import Metrics
from streamrank.service.pages import search_page as page
from streamrank.service.schemas import (
    BulkDeleteRequest,
    BulkDeleteResponse,
    DeleteResponse,
    DocumentOut,
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
from streamrank.service.state import ServiceUnavailable
from streamrank.types import Document, Query, Ranking

open_routes = APIRouter()
api = APIRouter(dependencies=[Depends(require_api_key)], responses=documented_errors(401))
PIPELINE_ERRORS = documented_errors(400, 404, 503)
"""What any route that runs a pipeline may answer besides 200, 401 and 422."""
BODY_ERRORS = {**PIPELINE_ERRORS, **documented_errors(403, 413, 415)}
WRITE_ERRORS = {**BODY_ERRORS, **documented_errors(507)}


@open_routes.get("/", include_in_schema=False)
async def search_page() -> HTMLResponse:
    return page()


@open_routes.get("/healthz", response_model=StatusResponse, tags=["service"])
async def healthz() -> StatusResponse:
    """Liveness: the process answers (pipelines may still be loading)."""
    return StatusResponse(status="ok", request_id=request_id())


@api.get("/readyz", response_model=StatusResponse, responses={503: {"model": StatusResponse}}, tags=["service"])
async def readyz(state: State) -> Any:
    """Readiness: 200 once every pipeline is loaded, its indexes open and models warm; 503 before.

    `status` is `ready`, or `degraded` when searches are served but writes would fail (`writable`
    false, `problems` says why) or stored documents were quarantined at startup (`quarantined`).
    """
    try:
        report = await state.ready_report()
    except ServiceUnavailable as exc:
        body = StatusResponse(status=state.status, message=str(exc), request_id=request_id())
        return JSONResponse(body.model_dump(), status_code=503)
    message = "; ".join(report["problems"]) or None
    if report["quarantined"]:
        count = sum(len(q) for q in report["quarantined"].values())
        message = "; ".join(filter(None, [message, f"{count} stored documents quarantined (see `quarantined`)"]))
    return StatusResponse(**report, message=message, request_id=request_id())


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


@api.post("/documents", response_model=UpsertResponse, responses=WRITE_ERRORS, tags=["documents"])
async def upsert_documents(body: UpsertRequest, state: State) -> UpsertResponse:
    """Insert or replace documents by id. Answered only once they are durable (fsynced) and in every index.

    All or nothing: every limit is checked before anything is written, and a write an index refuses
    (422) or a disk cannot take (507 full, 503 read-only) is undone in the store and the indexes.
    """
    settings = state.settings
    check_limit("the number of documents", len(body.documents), "max_upsert_documents", settings.max_upsert_documents)
    for i, doc in enumerate(body.documents):
        check_limit(f"documents.{i}.id (UTF-8 bytes)", len(doc.id.encode()), "max_id_bytes", settings.max_id_bytes)
        size = len(doc.title) + len(doc.text)
        check_limit(f"documents.{i} (title + text characters)", size, "max_document_chars", settings.max_document_chars)
    pipeline = state.pipeline(body.pipeline)
    docs = [Document(id=d.id, text=d.text, title=d.title) for d in body.documents]
    await state.upsert_async(pipeline, docs)
    return UpsertResponse(upserted=len(docs), ids=[d.id for d in docs], request_id=request_id())


@api.get("/documents/{doc_id:path}", response_model=DocumentOut, responses=PIPELINE_ERRORS, tags=["documents"])
async def get_document(doc_id: str, state: State, pipeline: str | None = None) -> DocumentOut:
    """One stored document."""
    doc = await state.get_async(state.pipeline(pipeline), doc_id)
    if doc is None:
        raise HTTPException(404, f"no document with id {show_id(doc_id)}")
    return DocumentOut(id=doc.id, title=doc.title, text=doc.text, request_id=request_id())


@api.delete("/documents", response_model=BulkDeleteResponse, responses=WRITE_ERRORS, tags=["documents"])
async def delete_documents(body: BulkDeleteRequest, state: State) -> BulkDeleteResponse:
    """Remove documents by id from every index and the store; ids not stored are listed in `missing`.

    Takes any stored id, however long (a quarantined one, say, that no URL could carry).
    """
    check_limit("the number of ids", len(body.ids), "max_upsert_documents", state.settings.max_upsert_documents)
    deleted, missing = await state.delete_many_async(state.pipeline(body.pipeline), body.ids)
    return BulkDeleteResponse(deleted=deleted, missing=missing, request_id=request_id())


@api.delete("/documents/{doc_id:path}", response_model=DeleteResponse, responses=WRITE_ERRORS, tags=["documents"])
async def delete_document(doc_id: str, state: State, pipeline: str | None = None) -> DeleteResponse:
    """Remove a document from every index and the store (404 when it is not stored)."""
    deleted = await state.delete_async(state.pipeline(pipeline), doc_id)
    if deleted is None:
        raise HTTPException(404, f"no document with id {show_id(doc_id)}")
    return DeleteResponse(deleted=deleted, request_id=request_id())
