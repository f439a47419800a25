"""Can the service write? A probe of its index folders (free space, a real write) for ``/readyz``."""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from pathlib import Path

from streamrank.store import short_message, storage_problem

MIN_FREE_BYTES = 1024 * 1024
"""Less free space than this in an index folder's file system counts as full."""
PROBE_NAME = ".streamrank-write-probe"


def write_problem(folder: Path) -> str | None:
    """Why ``folder`` (and the index folders in it) cannot take a write, or None when they can.

    Checks the free space of its file system and creates, writes and removes a small file in the
    folder and in each sub-folder (one per index): a read-only mount, a full disk or missing
    permissions show up as the error the write gets.
    """
    if not folder.exists():
        return None  # nothing is written there yet; the first write creates it
    try:
        stats = os.statvfs(folder)
    except OSError as exc:
        return f"{folder}: {short_message(exc)}"
    free = stats.f_bavail * stats.f_frsize
    if free < MIN_FREE_BYTES:
        return f"{folder}: the disk is full ({free} bytes free)"
    for target in _folders(folder):
        probe = target / PROBE_NAME
        try:
            with probe.open("wb") as handle:
                handle.write(b"0")
                handle.flush()
            probe.unlink()
        except OSError as exc:
            problem = storage_problem(exc) or "io"
            reason = {"full": "the disk is full", "read_only": "it is read-only", "io": "I/O error"}[problem]
            return f"{target} cannot be written ({reason}): {short_message(exc)}"
    return None


def _folders(folder: Path) -> Iterable[Path]:
    yield folder
    try:
        yield from sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError:
        return


class WriteHealth:
    """The last known writability of a set of index folders: probed at most every ``every_s``
    seconds; a real write that failed on the disk is reported for ``remember_s`` seconds (or until
    a write succeeds) even when the probe passes."""

    def __init__(self, every_s: float = 2.0, remember_s: float = 60.0) -> None:
        self.every_s = every_s
        self.remember_s = remember_s
        self._checked: dict[Path, tuple[float, str | None]] = {}
        self._last_error: dict[Path, tuple[float, str]] = {}

    def problems(self, folders: Iterable[Path]) -> list[str]:
        """Why writes to ``folders`` would fail now (empty when they would succeed)."""
        found: list[str] = []
        now = time.monotonic()
        for folder in folders:
            checked = self._checked.get(folder)
            if checked is None or now - checked[0] >= self.every_s:
                checked = (now, write_problem(folder))
                self._checked[folder] = checked
            if checked[1] is not None:
                found.append(checked[1])
            elif folder in self._last_error and now - self._last_error[folder][0] < self.remember_s:
                found.append(f"the last write failed: {self._last_error[folder][1]}")
        return found

    def write_failed(self, folder: Path, reason: str) -> None:
        self._last_error[folder] = (time.monotonic(), reason)
        self._checked.pop(folder, None)

    def write_succeeded(self, folder: Path) -> None:
        self._last_error.pop(folder, None)
