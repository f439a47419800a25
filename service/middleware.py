"""The ASGI middleware around every request: request id, JSON content type, body-size limit, metrics, 500s."""

from __future__ import annotations

import logging
import re
import time
import uuid

from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from streamrank.service.context import REQUEST_ID
from streamrank.service.errors import BodyTooLarge, error_body
from streamrank.service.metrics import Metrics

log = logging.getLogger("streamrank.service")

_SANE_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")


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
