"""Calls between Ray Serve deployments: awaited, bounded, typed.

- :func:`call` awaits one deployment-handle call with a time limit; a replica that died under a read is
  asked again (Serve's router picks another replica) at most ``retries`` times; when no replica answers
  in time, or none is left, the caller gets :class:`ServiceUnavailable` (HTTP 503 with ``Retry-After``)
  naming the deployment. Never an unbounded retry, never a blocked thread.
- :func:`read_consistent` runs a read once more when it caught an index between two generations
  (:class:`~streamrank.errors.IndexInconsistent`, matched by class).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any, TypeVar

from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError

from streamrank.errors import IndexInconsistent
from streamrank.service.batching import ServiceUnavailable
from streamrank.service.wire import unwrap

log = logging.getLogger("streamrank.service.ray")
T = TypeVar("T")

RETRIES = 2
"""Times a read is sent again when the replica answering it died."""
GONE = (RayActorError, ActorUnavailableError, ReplicaUnavailableError)
"""What a call raises when its replica died or went away under it."""


async def call(send: Callable[[], Any], what: str, *, timeout_s: float, retries: int = RETRIES) -> Any:
    """``await send()`` (a ``handle.method.remote(...)``), unwrapped (:mod:`streamrank.service.wire`).

    ``retries``: reads 2, writes 0 (a write whose writer died is answered 503; upserts and deletes by
    id can be sent again by the client). ``timeout_s`` bounds the whole call, retries included.
    """
    deadline = time.monotonic() + timeout_s
    for attempt in range(retries + 1):
        response = send()
        try:
            return unwrap(await asyncio.wait_for(_awaited(response), max(0.0, deadline - time.monotonic())))
        except TimeoutError:
            response.cancel()
            raise ServiceUnavailable(f"{what} has no healthy replica: no answer in {timeout_s:.0f} s") from None
        except (BackPressureError, DeploymentUnavailableError) as exc:
            raise ServiceUnavailable(f"{what} cannot take the request now ({type(exc).__name__})") from None
        except GONE as exc:
            if attempt == retries:
                raise ServiceUnavailable(f"{what} has no healthy replica ({type(exc).__name__})") from None
            log.warning("a replica of %s died under a call (%s); asking another", what, type(exc).__name__)
    raise AssertionError("unreachable")


async def _awaited(response: Any) -> Any:
    return await response


def read_consistent(read: Callable[[], T], pause_s: float = 0.05, attempts: int = 3) -> T:
    """``read()``; again after ``pause_s`` when it met an index being rewritten by the writer."""
    for attempt in range(attempts):
        try:
            return read()
        except IndexInconsistent:
            if attempt == attempts - 1:
                raise
            time.sleep(pause_s)
    raise AssertionError("unreachable")
