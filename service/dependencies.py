"""FastAPI dependencies and checks the routes share: the service state, the API key, limits, deadlines."""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException

from streamrank.service.settings import Settings
from streamrank.service.state import ServiceState


def get_state(request: Request) -> ServiceState:
    """The ServiceState of the app handling ``request``."""
    return request.app.state.service


def get_settings(request: Request) -> Settings:
    """The settings of the app handling ``request``."""
    return request.app.state.service.settings


State = Annotated[ServiceState, Depends(get_state)]

_bearer = HTTPBearer(auto_error=False, description="`Authorization: Bearer <STREAMRANK_API_KEY>`")
_api_key = APIKeyHeader(name="X-API-Key", auto_error=False, description="The service's STREAMRANK_API_KEY")


AUTH_FAILED = "missing or wrong API key: send `Authorization: Bearer <key>` or `X-API-Key: <key>`"


def key_matches(headers: Mapping[str, str], expected: str) -> bool:
    """True when ``headers`` present ``expected`` as a Bearer token or ``X-API-Key`` (constant time)."""
    authorization = headers.get("authorization", "")
    scheme, _, credentials = authorization.partition(" ")
    offered = credentials.strip() if scheme.lower() == "bearer" and credentials.strip() else headers.get("x-api-key")
    return offered is not None and secrets.compare_digest(offered.encode(), expected.encode())


def require_api_key(
    request: Request,
    bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    api_key: Annotated[str | None, Depends(_api_key)],
) -> None:
    """401 unless the service has no key or the request presents it (Bearer or X-API-Key).

    The request middleware checks the same before the body is read; this dependency documents the
    schemes in /openapi.json and guards routes mounted without that middleware.
    """
    expected = get_settings(request).api_key
    if not expected:
        return
    if not key_matches(request.headers, expected):
        raise HTTPException(401, AUTH_FAILED, headers={"WWW-Authenticate": "Bearer"})


def check_limit(what: str, value: int, setting: str, limit: int) -> None:
    """422 naming ``setting`` when ``value`` is over ``limit``."""
    if value > limit:
        raise HTTPException(422, f"{what} is {value}; the limit is {limit} ({setting})")


def deadline_of(request: Request, deadline_ms: float | None) -> float | None:
    """Absolute deadline (``time.monotonic()``) from the request's own budget or the default."""
    budget = deadline_ms if deadline_ms is not None else get_settings(request).deadline_ms
    return None if budget is None else request.scope["state"]["started"] + budget / 1000.0


def check_query(settings: Settings, text: str) -> None:
    """422 when the query is longer than ``max_query_chars``."""
    check_limit("the query length (characters)", len(text), "max_query_chars", settings.max_query_chars)
