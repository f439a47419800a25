"""The service under load: a ``streamrank serve`` child process and closed-loop HTTP clients.

Shared by `streamrank bench service` and `streamrank bench soak` (and the service tests): ``ServiceProcess``
starts a server on 127.0.0.1 from a service settings file, ``drive`` sends ``/search`` requests from
concurrent clients and reports throughput and latency percentiles, ``batch_counts`` reads the batch-size
histogram off the server's ``/metrics``.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx


# ---- a server in a child process -------------------------------------------------------------------
def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_ready(base_url: str, timeout: float = 120.0, headers: dict[str, str] | None = None) -> dict[str, Any]:
    """Poll /readyz until it answers 200; raise RuntimeError with the last answer otherwise."""
    deadline = time.monotonic() + timeout
    last: object = "no answer"
    while time.monotonic() < deadline:
        try:
            response = httpx.get(f"{base_url}/readyz", headers=headers, timeout=5)
            last = response.json()
            if response.status_code == 200:
                return response.json()
            if isinstance(last, dict) and last.get("status") == "error":
                break
        except (httpx.TransportError, ValueError) as exc:
            last = exc
        time.sleep(0.1)
    raise RuntimeError(f"server at {base_url} did not become ready: {last}")


class ServiceProcess:
    """``streamrank serve`` (or ``python -c code``) in a child process, configured by a service TOML.

    The child gets ``STREAMRANK_SERVICE_CONFIG`` and ``STREAMRANK_PORT``; its output goes to a log
    file next to the config. ``kill()`` is SIGKILL, i.e. a crash.
    """

    def __init__(
        self, config: Path, port: int | None = None, *, env: dict[str, str] | None = None, code: str | None = None
    ) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = config.with_suffix(f".{self.port}.log")
        child_env = {**os.environ, "STREAMRANK_SERVICE_CONFIG": str(config), "STREAMRANK_PORT": str(self.port)}
        child_env.update(env or {})
        command = [sys.executable, "-c", code] if code else [sys.executable, "-m", "streamrank", "serve"]
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(command, env=child_env, stdout=log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 180.0) -> dict[str, Any]:
        try:
            return wait_ready(self.url, timeout)
        except RuntimeError as exc:
            raise RuntimeError(f"{exc}\n--- server log (tail) ---\n{self.log_tail()}") from None

    def log_tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()

    def __enter__(self) -> ServiceProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ---- load --------------------------------------------------------------------------------------------
def percentile(sorted_values: list[float], p: float) -> float:
    """Nearest-rank percentile of already sorted values (0 for none)."""
    if not sorted_values:
        return 0.0
    rank = max(1, min(len(sorted_values), round(p / 100.0 * len(sorted_values) + 0.5)))
    return sorted_values[rank - 1]


async def drive(url: str, clients: int, queries: list[str], *, requests: int | None, seconds: float | None) -> dict:
    """``clients`` closed-loop clients posting /search until ``requests`` were sent or ``seconds`` passed."""
    latencies: list[float] = []
    errors: list[str] = []
    counter = itertools.count()
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:

        async def one(query: str) -> None:
            started = time.perf_counter()
            try:
                response = await client.post("/search", json={"query": query, "k": 10})
                if response.status_code != 200:
                    errors.append(f"{response.status_code}: {response.text[:200]}")
                    return
            except httpx.HTTPError as exc:
                errors.append(repr(exc))
                return
            latencies.append(time.perf_counter() - started)

        await asyncio.gather(*(one(queries[i % len(queries)]) for i in range(clients)))  # warm-up round
        latencies.clear()
        stop_at = None if seconds is None else time.perf_counter() + seconds

        async def worker() -> None:
            while True:
                i = next(counter)
                if (requests is not None and i >= requests) or (stop_at is not None and time.perf_counter() >= stop_at):
                    return
                await one(queries[i % len(queries)])

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        elapsed = time.perf_counter() - started
    ordered = sorted(latencies)
    return {
        "clients": clients,
        "requests": len(latencies) + len(errors),
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
        "seconds": round(elapsed, 3),
        "throughput_qps": round(len(latencies) / elapsed, 2) if elapsed > 0 else 0.0,
        "p50_ms": round(percentile(ordered, 50) * 1000, 2),
        "p95_ms": round(percentile(ordered, 95) * 1000, 2),
        "p99_ms": round(percentile(ordered, 99) * 1000, 2),
    }


def batch_counts(url: str, pipeline: str) -> tuple[float, float]:
    """(sum, count) of the server's ``streamrank_batch_size`` histogram for searches on ``pipeline``."""
    from prometheus_client.parser import text_string_to_metric_families

    values = {"sum": 0.0, "count": 0.0}
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=10).text):
        for sample in family.samples:
            if sample.labels.get("pipeline") == pipeline and sample.labels.get("kind") == "search":
                for suffix in values:
                    if sample.name == f"streamrank_batch_size_{suffix}":
                        values[suffix] = sample.value
    return values["sum"], values["count"]
