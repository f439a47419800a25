"""The ASGI middleware around every request: request id, security headers, HEAD, cross-site and
content-type checks on writes, the API key (before the body is read), the body-size limit,
request metrics and JSON 500s."""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import Callable
from urllib.parse import urlsplit

from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from streamrank.service.context import REQUEST_ID
from streamrank.service.dependencies import AUTH_FAILED, key_matches
from streamrank.service.errors import BodyTooLarge, error_body
from streamrank.service.metrics import Metrics
from streamrank.service.settings import Settings

log = logging.getLogger("streamrank.service")

_SANE_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
BODY_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Content-Security-Policy": "default-src 'none'; frame-ancestors 'none'",
}
"""On every response unless the route set its own (the page and /docs set a CSP that lets them load)."""


def _is_json(content_type: str | None) -> bool:
    media = (content_type or "").split(";")[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


def _curl_form(content_type: str | None) -> bool:
    """A missing content type or curl's default form type (not multipart uploads, not text)."""
    return content_type is None or content_type.split(";")[0].strip().lower() in ("", "application/x-www-form-urlencoded")


def _from_browser(headers: Headers) -> bool:
    return "origin" in headers or "sec-fetch-mode" in headers or "sec-fetch-site" in headers


def foreign_origin(headers: Headers, allowed: list[str]) -> str | None:
    """The request's Origin when it is another site's (not the Host it was sent to, nor allowed)."""
    origin = headers.get("origin")
    if origin is None:
        return "a cross-site page" if headers.get("sec-fetch-site") == "cross-site" else None
    if origin in allowed:
        return None
    parts = urlsplit(origin)
    if origin != "null" and parts.scheme in ("http", "https") and parts.netloc.lower() == headers.get("host", "").lower():
        return None
    return origin


class RequestContextMiddleware:
    """Everything each request goes through before and after its route (see the module docstring)."""

    def __init__(self, app: ASGIApp, *, settings: Settings, metrics: Metrics, is_open: Callable[[str], bool]) -> None:
        self.app = app
        self.settings = settings
        self.max_body_bytes = settings.max_body_bytes
        self.metrics = metrics
        self.is_open = is_open

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        headers = Headers(scope=scope)
        client_id = headers.get("x-request-id", "")
        rid = client_id if _SANE_ID.fullmatch(client_id) else uuid.uuid4().hex
        token = REQUEST_ID.set(rid)
        method = scope["method"]
        scope.setdefault("state", {})["started"] = time.monotonic()
        status, response_started, received = 500, False, 0
        head = method == "HEAD"
        if head:  # served as the GET it stands for, without the body
            scope = {**scope, "method": "GET"}

        async def send_with_id(message: Message) -> None:
            nonlocal status, response_started
            if message["type"] == "http.response.start":
                response_started, status = True, message["status"]
                out = MutableHeaders(scope=message)
                out["X-Request-ID"] = rid
                for name, value in SECURITY_HEADERS.items():
                    if name not in out:
                        out[name] = value
            elif head and message["type"] == "http.response.body":
                message = {**message, "body": b""}
            await send(message)

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_body_bytes:
                raise BodyTooLarge(self.max_body_bytes)
            return message

        try:
            refusal = self._refusal(scope, headers)
            if refusal is not None:
                await refusal(scope, receive, send_with_id)
            else:
                await self.app(scope, limited_receive, send_with_id)
        except Exception:
            log.exception("unhandled error in %s %s (request %s)", method, scope["path"], rid)
            if response_started:
                raise
            await error_body(500, "internal error; quote the request id when reporting it", "internal_error")(
                scope, receive, send_with_id
            )
        finally:
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            self.metrics.observe_request(method, route, status, time.perf_counter() - started)
            REQUEST_ID.reset(token)

    def _refusal(self, scope: Scope, headers: Headers):
        """An error response for a request refused before it reaches a route (and before its body is
        read), or None. Rewrites a curl-style JSON body's content type in ``scope`` on the way."""
        method = scope["method"]
        expected = self.settings.api_key
        if expected and not self.is_open(scope["path"]) and not key_matches(headers, expected):
            response = error_body(401, AUTH_FAILED, "http_error")
            response.headers["WWW-Authenticate"] = "Bearer"
            return response
        if method not in SAFE_METHODS:
            origin = foreign_origin(headers, self.settings.allowed_origins)
            if origin is not None:
                return error_body(
                    403,
                    f"cross-origin write refused: requests from {origin} may not change this service "
                    "(add the origin to `allowed_origins` to allow it)",
                    "cross_origin",
                )
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_body_bytes:
            return error_body(413, BodyTooLarge(self.max_body_bytes).detail, "body_too_large")
        content_type = headers.get("content-type")
        has_body = (length.isdigit() and int(length) > 0) or "transfer-encoding" in headers
        if method in BODY_METHODS and has_body and not _is_json(content_type) and _curl_form(content_type):
            if _from_browser(headers) or not self.settings.json_without_content_type:
                return error_body(
                    415, "send the body as JSON with `Content-Type: application/json`", "unsupported_media_type"
                )
            # Every body this API takes is JSON: `curl -d '{...}'` (form content type) must just work.
            scope["headers"] = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
            scope["headers"].append((b"content-type", b"application/json"))
        return None
