"""Exceptions -> HTTP answers: every error is an ErrorResponse body carrying the request id.

``install_error_handlers(app)`` maps validation errors, HTTP errors, StreamRankError (400 unless
ERROR_STATUS says otherwise), StorageError (507 for a full disk, 503 otherwise, with the reason),
ServiceUnavailable (503 with ``Retry-After``) and UnknownPipeline (404).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.routing import Match

from streamrank.errors import (
    DatasetNotFoundError,
    IndexMissingError,
    InvalidQueryError,
    StreamRankError,
)
from streamrank.pipeline import DocumentsRefused
from streamrank.service.context import request_id
from streamrank.service.schemas import ErrorResponse
from streamrank.service.state import ServiceUnavailable, UnknownPipeline
from streamrank.store import StorageError

ERROR_STATUS: dict[type[StreamRankError], int] = {
    InvalidQueryError: 422,
    IndexMissingError: 404,
    DatasetNotFoundError: 404,
    DocumentsRefused: 422,
}
"""StreamRankError subclasses that are not a plain 400."""

ERROR_ANSWERS: dict[int, str] = {
    400: "The pipeline rejected the request",
    401: "Missing or wrong API key (only when the service has one)",
    404: "Unknown pipeline, document, index or dataset",
    403: "A write from a browser page of another origin (not in `allowed_origins`)",
    413: "The body is larger than `max_body_bytes`",
    415: "A browser sent a body without `Content-Type: application/json`",
    503: "Pipelines are still loading or failed to load, the service is stopping, or an index folder "
    "cannot be written (`Retry-After` says when to retry)",
    507: "The disk holding the index folder is full: nothing of the write was kept",
}


def documented_errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` for the error answers a route can give (all shaped as ErrorResponse)."""
    return {code: {"model": ErrorResponse, "description": ERROR_ANSWERS[code]} for code in codes}


def error_body(status: int, message: str, kind: str, errors: list[dict[str, Any]] | None = None) -> JSONResponse:
    """An ErrorResponse with ``status``, carrying the current request id."""
    body = ErrorResponse(message=message, type=kind, request_id=request_id(), errors=errors)
    return JSONResponse(body.model_dump(exclude_none=True), status_code=status)


class BodyTooLarge(HTTPException):
    """413: the request body is over ``max_body_bytes``."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body is larger than the limit of {limit} bytes (max_body_bytes)")


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


def _unparsable(cause: BaseException | None) -> str:
    if isinstance(cause, RecursionError):
        return "invalid request: the body is nested too deeply to parse"
    if isinstance(cause, UnicodeDecodeError):
        return f"invalid request: the body is not valid JSON ({cause.reason})"
    return "invalid request: the body could not be parsed as JSON"


async def _on_http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 400 and exc.detail == "There was an error parsing the body":  # FastAPI's
        return error_body(422, _unparsable(exc.__cause__), "validation_error")
    response = error_body(exc.status_code, str(exc.detail), "http_error")
    response.headers.update(exc.headers or {})
    if exc.status_code == 405:
        allowed = _allowed_methods(request)
        response.headers["Allow"] = ", ".join(allowed + ["HEAD"] if "GET" in allowed and "HEAD" not in allowed else allowed)
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


async def _on_storage_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StorageError)
    if exc.problem == "full":
        return error_body(507, str(exc), "insufficient_storage")
    response = error_body(503, str(exc), "storage_unavailable")
    response.headers["Retry-After"] = "30"
    return response


async def _on_unavailable(request: Request, exc: Exception) -> JSONResponse:
    response = error_body(503, str(exc), "unavailable")
    response.headers["Retry-After"] = "1"
    return response


async def _on_unknown_pipeline(request: Request, exc: Exception) -> JSONResponse:
    return error_body(404, str(exc), "unknown_pipeline")


def install_error_handlers(app: FastAPI) -> None:
    """Register the handlers above on ``app``."""
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(HTTPException, _on_http_error)
    app.add_exception_handler(StreamRankError, _on_streamrank_error)
    app.add_exception_handler(StorageError, _on_storage_error)
    app.add_exception_handler(ServiceUnavailable, _on_unavailable)
    app.add_exception_handler(UnknownPipeline, _on_unknown_pipeline)
