"""Serve's HTTP proxy, made to answer a request whose ingress replica died: retried, or 503 with ``Retry-After``.

What Ray Serve 2.60's proxy does on its own: a request in flight on an ingress replica that dies ends in
a ``RayActorError``; the proxy maps every exception other than a timeout (408), a client disconnect
(499), back pressure (429/503) and ``DeploymentUnavailableError`` (503, without ``Retry-After``) to 500
(``ray/serve/_private/http_util.py``, ``get_http_response_status``), sends no response of its own for a
500 (``send_http_response_on_exception`` sends only 408, 429 and 503), and the ASGI server then answers
``500 Internal Server Error``. The router retries a request only while it is being *assigned* to a
replica (rejections, a replica found dead before it accepted the request: ``router.py``), never one that
a replica already runs; ``HTTPOptions.middlewares`` is removed (``serve/config.py``). The hook left is
the environment variable ``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH``: a function the proxy calls at
start for a list of Starlette middlewares wrapped around itself. :func:`middlewares` is that function.

:class:`RetryLostReplica` (outside the proxy) keeps the request's body, and when the proxy returns
without starting a response (the replica died or became unreachable; the application itself always
answers, errors included) sends the request again after a short pause, to another replica (the router
has marked the dead one). Every route may be sent again: searches and reranks only read; writes are
upserts and deletes by id, so a second delivery leaves the same state (a single delete whose first
delivery had applied answers 404, which is what is stored). After the last attempt it answers 503 with
``Retry-After``; a 503 the proxy sends without ``Retry-After`` gets one. An answer that came after
sending again carries ``X-StreamRank-Resent: <times>``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from starlette.middleware import Middleware

Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[MutableMapping[str, Any], Receive, Send], Awaitable[None]]

CALLBACK = "streamrank.service.ray_proxy:middlewares"
"""The value of ``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH`` that installs :class:`RetryLostReplica`."""
PAUSES_S = (0.2, 0.5, 1.0, 2.0)
"""Pause before each further attempt (the replica's death reaches the router within a second or two)."""
RETRY_AFTER_S = 1
RESENT_HEADER = b"x-streamrank-resent"
"""Set on an answer that came after the request was sent again: how many times it was (the replicas it lost)."""
MAX_REPLAYED_BODY = 16 * 1024 * 1024
"""Bodies larger than this are streamed through, not kept: such a request is answered 503 when lost."""


class RetryLostReplica:
    """ASGI middleware: HTTP requests the wrapped proxy returns without answering are sent again, then 503."""

    def __init__(self, app: ASGIApp, pauses_s: tuple[float, ...] = PAUSES_S, retry_after_s: int = RETRY_AFTER_S) -> None:
        self.app, self.pauses_s, self.retry_after_s = app, pauses_s, retry_after_s

    async def __call__(self, scope: MutableMapping[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        body, complete = await read_body(receive)
        for resent, pause in enumerate((*self.pauses_s, None)):
            started = False

            async def forward(message: Message, resent: int = resent) -> None:
                nonlocal started
                if message["type"] == "http.response.start":
                    started = True
                    if message["status"] == 503:
                        message = with_header(message, b"retry-after", str(self.retry_after_s).encode())
                    if resent:
                        message = with_header(message, RESENT_HEADER, str(resent).encode())
                await send(message)

            client = Replay(body, receive)
            try:
                await self.app(scope, client, forward)
            except Exception:
                if started:
                    raise
            if started or client.gone:  # answered, or nobody is left to answer
                return
            if pause is None or not complete:
                break
            await asyncio.sleep(pause)
        await unavailable(scope, send, self.retry_after_s)


async def read_body(receive: Receive) -> tuple[list[Message], bool]:
    """The request's body messages, up to :data:`MAX_REPLAYED_BODY`; whether all of it was read."""
    messages: list[Message] = []
    size = 0
    while True:
        message = await receive()
        messages.append(message)
        if message["type"] != "http.request" or not message.get("more_body", False):
            return messages, True
        size += len(message.get("body", b""))
        if size > MAX_REPLAYED_BODY:
            return messages, False


class Replay:
    """A ``receive`` that gives the kept body messages again, then waits on the client; ``gone`` once
    the client disconnected (a lost request is then not sent again)."""

    def __init__(self, body: list[Message], receive: Receive) -> None:
        self.pending, self.receive = list(body), receive
        self.gone = any(m["type"] == "http.disconnect" for m in body)

    async def __call__(self) -> Message:
        message = self.pending.pop(0) if self.pending else await self.receive()
        self.gone = self.gone or message["type"] == "http.disconnect"
        return message


def with_header(start: Message, name: bytes, value: bytes) -> Message:
    """``start`` (an ``http.response.start`` message) with the header ``name`` added unless it has one."""
    headers = list(start.get("headers", []))
    if not any(key.lower() == name for key, _ in headers):
        headers.append((name, value))
    return {**start, "headers": headers}


async def unavailable(scope: MutableMapping[str, Any], send: Send, retry_after_s: int) -> None:
    """503 with ``Retry-After`` and the service's error body (the client's ``X-Request-ID`` when it sent one)."""
    from streamrank.service.schemas import ErrorResponse

    sent = dict(scope.get("headers", [])).get(b"x-request-id", b"").decode("latin-1")
    message = "the replica serving this request was lost and no other answered it in time; send it again"
    body = ErrorResponse(message=message, type="unavailable", request_id=sent).model_dump_json(exclude_none=True).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               (b"retry-after", str(retry_after_s).encode())]
    await send({"type": "http.response.start", "status": 503, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def middlewares() -> list[Middleware]:
    """The proxy callback (``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH`` = :data:`CALLBACK`)."""
    return [Middleware(RetryLostReplica)]


__all__ = ["CALLBACK", "RetryLostReplica", "middlewares"]
