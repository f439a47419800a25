"""The id of the request being handled (set by the request middleware, read by routes and error bodies)."""

from __future__ import annotations

from contextvars import ContextVar

REQUEST_ID: ContextVar[str] = ContextVar("request_id", default="-")


def request_id() -> str:
    """The id of the request being handled."""
    return REQUEST_ID.get()
