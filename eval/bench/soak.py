"""`streamrank bench soak` (``run_soak_benchmark``): the long run of the real server.

One server, SOAK_CLIENTS closed-loop clients for ``$STREAMRANK_SOAK_SECONDS`` (default 600) after a
warm-up minute, sampling the server's resident memory every few seconds; it reports errors, latency
and memory growth against the target (under 10% growth from the end of the warm-up, zero errors).
``quick`` soaks BM25 over the first QUICK_DOCS SciFact documents for a few seconds (a smoke run).
The server's settings file comes from the service benchmark's ``server_settings``.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from streamrank.eval.bench.service import QUICK_DOCS, quick_index, scifact_queries, server_settings
from streamrank.eval.bench.service_load import ServiceProcess, drive

SOAK_CLIENTS = 8
SOAK_SECONDS = 600.0
SOAK_WARMUP_SECONDS = 60.0
SOAK_SAMPLE_SECONDS = 5.0
SOAK_PIPELINE = "hybrid"
SOAK_MAX_GROWTH_PCT = 10.0
QUICK_SOAK = {"seconds": 6.0, "warmup_seconds": 2.0, "sample_seconds": 0.5}


def rss_bytes(pid: int) -> int:
    """Resident memory of process ``pid`` and its children (psutil; /proc/<pid>/status VmRSS without it)."""
    try:
        import psutil
    except ImportError:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError(f"no VmRSS for process {pid}") from None
    proc = psutil.Process(pid)
    total = proc.memory_info().rss
    for child in proc.children(recursive=True):
        try:
            total += child.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


async def _sample_rss(pid: int, every: float, started: float, samples: list[tuple[float, float]], done: asyncio.Event) -> None:
    """Append (seconds since ``started``, RSS MiB) every ``every`` seconds until ``done``, and once more then.

    Stops early (quietly) if the process is gone: the requests then fail and the caller reports that.
    """
    while True:
        try:
            samples.append((round(time.perf_counter() - started, 2), round(rss_bytes(pid) / 2**20, 1)))
        except Exception:  # psutil.NoSuchProcess, or /proc/<pid> gone
            return
        if done.is_set():
            return
        try:
            await asyncio.wait_for(done.wait(), timeout=every)
        except TimeoutError:
            pass


def _slope_per_minute(samples: list[tuple[float, float]]) -> float:
    """Least-squares slope of RSS (MiB) over time, per minute."""
    import numpy as np

    times = np.array([t for t, _ in samples])
    if len(samples) < 2 or np.ptp(times) == 0:
        return 0.0
    return float(np.polyfit(times, [m for _, m in samples], 1)[0]) * 60.0


async def soak(
    url: str,
    pid: int,
    queries: list[str],
    *,
    clients: int = SOAK_CLIENTS,
    seconds: float = SOAK_SECONDS,
    warmup_seconds: float = SOAK_WARMUP_SECONDS,
    sample_seconds: float = SOAK_SAMPLE_SECONDS,
) -> dict[str, Any]:
    """Warm up, then ``clients`` closed-loop clients for ``seconds`` while sampling the RSS of ``pid``.

    Memory growth is measured from the RSS at the end of the warm-up (caches, models and allocator
    pools are filled by then) to the last sample; errors count both phases.
    """
    warmup = await drive(url, clients, queries, requests=None, seconds=warmup_seconds)
    samples: list[tuple[float, float]] = []
    done = asyncio.Event()
    started = time.perf_counter()
    sampler = asyncio.create_task(_sample_rss(pid, sample_seconds, started, samples, done))
    try:
        run = await drive(url, clients, queries, requests=None, seconds=seconds)
    finally:
        done.set()
        await sampler
    if not samples:
        raise RuntimeError(f"could not read the memory of the server process {pid}")
    start_mb, end_mb = samples[0][1], samples[-1][1]
    peak_mb = max(m for _, m in samples)
    growth = (end_mb - start_mb) / start_mb * 100.0 if start_mb else 0.0
    errors = run["errors"] + warmup["errors"]
    return {
        **run,
        "errors": errors,
        "first_error": run["first_error"] or warmup["first_error"],
        "warmup": {key: warmup[key] for key in ("requests", "errors", "seconds", "throughput_qps")},
        "rss_baseline": "end of the warm-up",
        "rss_start_mb": start_mb,
        "rss_end_mb": end_mb,
        "rss_peak_mb": peak_mb,
        "rss_growth_pct": round(growth, 2),
        "rss_peak_growth_pct": round((peak_mb - start_mb) / start_mb * 100.0, 2) if start_mb else 0.0,
        "rss_slope_mb_per_min": round(_slope_per_minute(samples), 3),
        "rss_samples": samples,
        "target": f"< {SOAK_MAX_GROWTH_PCT:g}% RSS growth, zero errors",
        "met": growth < SOAK_MAX_GROWTH_PCT and errors == 0,
    }


def run_soak_benchmark(output_dir: Path | None = None, quick: bool = False) -> dict[str, Any]:
    """`streamrank bench soak`: one server, SOAK_CLIENTS clients for ``$STREAMRANK_SOAK_SECONDS`` (default 600).

    The pipeline is ``$STREAMRANK_SOAK_PIPELINE`` (default hybrid, over the SciFact indexes under
    ``$STREAMRANK_HOME``); ``quick`` soaks BM25 over the first QUICK_DOCS SciFact documents for a few seconds.
    Writes ``soak.md`` (and, through ``streamrank bench``, ``soak.json``).
    """
    if quick:
        pipeline, timing = "bm25", QUICK_SOAK
    else:
        pipeline = os.environ.get("STREAMRANK_SOAK_PIPELINE", SOAK_PIPELINE)
        timing = {
            "seconds": float(os.environ.get("STREAMRANK_SOAK_SECONDS", SOAK_SECONDS)),
            "warmup_seconds": SOAK_WARMUP_SECONDS,
            "sample_seconds": SOAK_SAMPLE_SECONDS,
        }
    with tempfile.TemporaryDirectory(prefix="streamrank-bench-soak-") as tmp:
        work = Path(tmp)
        extra = quick_index(work) if quick else ""
        config = work / "soak.toml"
        config.write_text(server_settings(pipeline, batching=True, workers=1, torch_threads=1, extra=extra))
        with ServiceProcess(config) as server:
            server.wait_ready(timeout=600)
            result = asyncio.run(soak(server.url, server.proc.pid, scifact_queries(), **timing))
            if server.proc.poll() is not None:
                raise RuntimeError(f"the server exited during the soak\n{server.log_tail()}")
    figures = {
        "dataset": f"scifact (first {QUICK_DOCS} documents)" if quick else "scifact",
        "endpoint": "POST /search k=10",
        "pipeline": pipeline,
        "server": {"workers": 1, "torch_threads": 1, "batching": True},
        **timing,
        **result,
    }
    print(soak_line(figures), flush=True)
    if output_dir is not None:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "soak.md").write_text(soak_markdown(figures))
    return figures


def soak_line(f: dict[str, Any]) -> str:
    return (
        f"soak {f['pipeline']} clients={f['clients']} {f['seconds']:.0f}s: {f['requests']} requests, {f['errors']} errors, "
        f"{f['throughput_qps']} q/s, p50/p95/p99 {f['p50_ms']}/{f['p95_ms']}/{f['p99_ms']} ms, RSS {f['rss_start_mb']} -> "
        f"{f['rss_end_mb']} MiB (peak {f['rss_peak_mb']}, {f['rss_growth_pct']:+}%): {'met' if f['met'] else 'NOT met'}"
    )


def soak_markdown(f: dict[str, Any]) -> str:
    lines = [
        f"Soak: {f['endpoint']} on {f['dataset']}, pipeline {f['pipeline']}, {f['clients']} closed-loop clients for "
        f"{f['seconds']:g} s after a {f['warmup_seconds']:g} s warm-up; server {f['server']}. RSS of the server "
        f"process every {f['sample_seconds']:g} s, growth measured from the {f['rss_baseline']}.",
        "",
        "| requests | errors | q/s | p50 ms | p95 ms | p99 ms | RSS start MiB | RSS end MiB | RSS peak MiB | growth | slope MiB/min | target met |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
        f"| {f['requests']} | {f['errors']} | {f['throughput_qps']} | {f['p50_ms']} | {f['p95_ms']} | {f['p99_ms']} | "
        f"{f['rss_start_mb']} | {f['rss_end_mb']} | {f['rss_peak_mb']} | {f['rss_growth_pct']:+}% | "
        f"{f['rss_slope_mb_per_min']:+} | {'yes' if f['met'] else 'no'} ({f['target']}) |",
    ]
    if f["first_error"]:
        lines += ["", f"First error: {f['first_error']}"]
    return "\n".join(lines) + "\n"
