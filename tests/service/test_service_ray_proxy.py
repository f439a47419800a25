"""The Serve HTTP proxy's middleware (streamrank.service.ray_proxy): a request the proxy returns without
answering (its ingress replica died) is sent again with the same body, then answered 503 with
``Retry-After``; answers the application gave pass through untouched. The wrapped app stands in for Serve's
proxy, which sends nothing for a request whose replica died; the whole path runs in
``tests/cluster/test_multinode.py`` (an ingress replica killed under load)."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest
from starlette.middleware import Middleware

from streamrank.service.ray_proxy import RetryLostReplica, middlewares


class FlakyProxy:
    """Loses the first ``lost`` requests (returns without a response, or raises as Serve's handle does),
    then answers ``status`` with the request body echoed."""

    def __init__(self, lost: int, status: int = 200, raises: bool = False, headers: list[tuple[bytes, bytes]] | None = None) -> None:
        self.lost, self.status, self.raises, self.headers = lost, status, raises, headers or []
        self.bodies: list[bytes] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body", False):
                break
        self.bodies.append(body)
        if len(self.bodies) <= self.lost:
            if self.raises:
                raise RuntimeError("the replica died")
            return
        await send({"type": "http.response.start", "status": self.status, "headers": self.headers})
        await send({"type": "http.response.body", "body": body})


def post(app: Any, body: bytes, headers: dict[str, str] | None = None) -> httpx.Response:
    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=RetryLostReplica(app, pauses_s=(0.0, 0.0, 0.0)))
        async with httpx.AsyncClient(transport=transport, base_url="http://proxy") as client:
            return await client.post("/documents", content=body, headers=headers or {})

    return asyncio.run(go())


@pytest.mark.parametrize("raises", [False, True])
def test_a_lost_request_is_sent_again_with_its_body(raises: bool) -> None:
    proxy = FlakyProxy(lost=2, raises=raises)
    reply = post(proxy, b'{"documents": []}')
    assert reply.status_code == 200 and reply.content == b'{"documents": []}'
    assert reply.headers["X-StreamRank-Resent"] == "2"
    assert proxy.bodies == [b'{"documents": []}'] * 3


def test_a_request_lost_every_time_is_a_503_with_retry_after() -> None:
    proxy = FlakyProxy(lost=10)
    reply = post(proxy, b"{}", {"X-Request-ID": "req-7"})
    assert reply.status_code == 503 and reply.headers["Retry-After"] == "1"
    assert reply.json()["type"] == "unavailable" and reply.json()["request_id"] == "req-7"
    assert len(proxy.bodies) == 4  # the first attempt and one after each pause


def test_the_application_answers_pass_through_and_a_503_gets_retry_after() -> None:
    failed = FlakyProxy(lost=0, status=500)
    answered = post(failed, b"x")
    assert answered.status_code == 500 and len(failed.bodies) == 1  # an answer is never sent again
    assert "X-StreamRank-Resent" not in answered.headers
    busy = FlakyProxy(lost=0, status=503)
    reply = post(busy, b"x")
    assert reply.status_code == 503 and reply.headers["Retry-After"] == "1" and len(busy.bodies) == 1
    kept = FlakyProxy(lost=0, status=503, headers=[(b"retry-after", b"30")])
    assert post(kept, b"x").headers.get_list("Retry-After") == ["30"]


def test_the_proxy_callback_returns_the_middleware() -> None:
    (installed,) = middlewares()
    assert isinstance(installed, Middleware) and installed.cls is RetryLostReplica


def test_a_request_whose_client_left_is_not_sent_again() -> None:
    sent: list[dict[str, Any]] = []
    messages = [{"type": "http.request", "body": b"{}", "more_body": False}, {"type": "http.disconnect"}]

    async def receive() -> dict[str, Any]:
        return messages.pop(0)

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    class Leaves(FlakyProxy):
        async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
            await super().__call__(scope, receive, send)
            await receive()  # the proxy watches for the client's disconnect

    proxy = Leaves(lost=10)
    asyncio.run(RetryLostReplica(proxy, pauses_s=(0.0, 0.0))({"type": "http", "headers": []}, receive, send))
    assert len(proxy.bodies) == 1 and sent == []
