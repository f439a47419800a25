"""FastAPI dependencies and checks the routes share: the service state, the API key, limits, deadlines."""

from __future__ import annotations

import secrets
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
