"""Errors across process boundaries, by type: a deployment returns :class:`Raised` instead of letting an
exception escape (Ray would wrap it in a ``RayTaskError`` whose text carries the remote traceback), and
the caller raises the same class again with the same message and attributes, so the service's error
handlers (404, 422, 503, 507...) and retries (``IndexInconsistent``) match on the class, never on text.
"""

from __future__ import annotations

import pickle
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Raised:
    """An exception as a value: its class (pickled by reference), ``args`` and attributes."""

    cls: type[BaseException]
    args: tuple[Any, ...]
    state: dict[str, Any]

    @classmethod
    def of(cls, exc: BaseException) -> Raised:
        """``exc`` as a value; one whose class or attributes cannot cross (a Java exception) becomes a
        :class:`~streamrank.errors.StreamRankError` with its one-line message."""
        from streamrank.errors import StreamRankError
        from streamrank.store import short_message

        raised = cls(type(exc), tuple(exc.args), dict(vars(exc)))
        try:
            pickle.loads(pickle.dumps(raised))
        except Exception:
            return cls(StreamRankError, (short_message(exc),), {})
        return raised

    def rebuild(self) -> BaseException:
        """The exception again (``__init__`` is not called: the message and attributes are the original's)."""
        exc = self.cls.__new__(self.cls)
        exc.args = self.args
        exc.__dict__.update(self.state)
        return exc


def unwrap(value: T | Raised) -> T:
    """``value``, or raise the exception it stands for."""
    if isinstance(value, Raised):
        raise value.rebuild()
    return value


def answer(call: Callable[[], T]) -> T | Raised:
    """``call()``, or what it raised as a :class:`Raised` (for deployment methods)."""
    try:
        return call()
    except Exception as exc:
        return Raised.of(exc)


async def answer_async(call: Callable[[], Awaitable[T]]) -> T | Raised:
    """``await call()``, or what it raised as a :class:`Raised`."""
    try:
        return await call()
    except Exception as exc:
        return Raised.of(exc)
