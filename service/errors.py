"""Exceptions -> HTTP answers: every error is an ErrorResponse body carrying the request id.

``install_error_handlers(app)`` maps validation errors, HTTP errors, StreamRankError (400 unless
ERROR_STATUS says otherwise), ServiceUnavailable (503 with ``Retry-After``) and UnknownPipeline (404).
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
from streamrank.service.context import request_id
from streamrank.service.schemas import ErrorResponse
from streamrank.service.state import ServiceUnavailable, UnknownPipeline

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


def install_error_handlers(app: FastAPI) -> None:
    """Register the handlers above on ``app``."""
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(HTTPException, _on_http_error)
    app.add_exception_handler(StreamRankError, _on_streamrank_error)
    app.add_exception_handler(ServiceUnavailable, _on_unavailable)
    app.add_exception_handler(UnknownPipeline, _on_unknown_pipeline)
