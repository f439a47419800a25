"""The app under uvicorn: a graceful stop on SIGTERM/SIGINT that exits 0, and a deadline for the
headers of each request (a client trickling header bytes is disconnected)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
import time
from collections.abc import Iterator
from types import FrameType
from typing import Any

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from streamrank.service.settings import Settings

log = logging.getLogger("streamrank.service")

STARTUP_FAILURE = 3
"""Exit status when the server could not start (uvicorn's own)."""
_TIMEOUT_RESPONSE = b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"


class HeaderTimeoutProtocol(H11Protocol):
    """uvicorn's h11 protocol, closing a connection whose request headers are not complete
    ``header_timeout_s`` after it opened or after its previous response (slowloris)."""

    header_timeout_s: float = 10.0
    _header_timer: asyncio.TimerHandle | None = None
    _waiting_cycle: Any = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_timer()

    def on_response_complete(self) -> None:
        self._arm_header_timer()  # before uvicorn starts a pipelined request, which then counts as in time
        super().on_response_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)

    def _arm_header_timer(self) -> None:
        self._cancel_header_timer()
        self._waiting_cycle = self.cycle
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._headers_late)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_late(self) -> None:
        self._header_timer = None
        if self.cycle is not self._waiting_cycle or self.transport.is_closing():
            return  # a request's headers arrived in time (uvicorn started a new cycle for it)
        log.warning(
            "closing a connection from %s: no complete request headers within %.1f s (header_timeout_s)",
            f"{self.client[0]}:{self.client[1]}" if self.client else "a client", self.header_timeout_s,
        )
        with contextlib.suppress(Exception):
            self.transport.write(_TIMEOUT_RESPONSE)
        self.transport.close()


def header_timeout_protocol(seconds: float) -> type[HeaderTimeoutProtocol]:
    """A HeaderTimeoutProtocol class with this deadline (uvicorn takes a class as ``http``)."""
    return type("HeaderTimeoutProtocol", (HeaderTimeoutProtocol,), {"header_timeout_s": seconds})


def server_config(app: Any, settings: Settings, **overrides: Any) -> uvicorn.Config:
    """The uvicorn configuration the service runs with (tests start the same)."""
    options: dict[str, Any] = dict(
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        http=header_timeout_protocol(settings.header_timeout_s),
        timeout_graceful_shutdown=settings.shutdown_timeout_s,
        lifespan="on",
    )
    options.update(overrides)
    return uvicorn.Config(app, **options)


class GracefulServer(uvicorn.Server):
    """uvicorn's server, except that a SIGTERM or SIGINT after which it shut down cleanly ends the
    process with status 0: uvicorn re-raises the signal after its shutdown, which would kill the
    process with it (status 143, or a KeyboardInterrupt traceback for SIGINT)."""

    stop_signal: int | None = None
    stop_requested_at: float | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.stop_requested_at is None:
            self.stop_requested_at = time.monotonic()
            log.info("%s: draining in-flight requests, then closing the indexes", signal.Signals(sig).name)
        super().handle_exit(sig, frame)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        with super().capture_signals():
            try:
                yield
            finally:
                captured: list[int] = getattr(self, "_captured_signals", [])
                if captured:
                    self.stop_signal = captured[0]
                    captured.clear()  # uvicorn would raise them again once its handlers are restored


def run_server(app: Any, settings: Settings) -> None:
    """Serve ``app`` until SIGTERM/SIGINT; exit status 0 after a clean stop, 3 when it could not start."""
    server = GracefulServer(server_config(app, settings))
    server.run()
    if not server.started:
        sys.exit(STARTUP_FAILURE)
    if server.stop_requested_at is not None and server.stop_signal is not None:
        log.info(
            "stopped on %s: drained and closed in %.2f s",
            signal.Signals(server.stop_signal).name, time.monotonic() - server.stop_requested_at,
        )
