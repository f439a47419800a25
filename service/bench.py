"""`streamrank bench service`: throughput and latency of the real server, with and without micro-batching.

For each pipeline (BM25, dense, hybrid, e2rank over SciFact) and each batching mode, a fresh server is
started with ``streamrank serve`` on 127.0.0.1 (a free port), then 1, 8 and 32 concurrent
clients (httpx, asyncio, closed loop: each sends its next query when the last one is answered)
send SciFact test queries to ``/search``. Reported per cell: throughput, p50/p95/p99 latency,
errors, and the mean batch size the server formed (from its /metrics).

The full run uses the SciFact indexes under ``$STREAMRANK_HOME/indexes/scifact`` (build them with
``streamrank index -p configs/<name>.toml``); a pipeline whose server does not become ready is
reported under ``skipped`` with the server's reason. ``quick`` indexes the first 1,000 SciFact
documents with BM25 into a temporary folder and sends fewer requests: a smoke run.

`streamrank bench soak` (``run_soak_benchmark``) is the long run: one server, SOAK_CLIENTS closed-loop
clients for ``$STREAMRANK_SOAK_SECONDS`` (default 600) after a warm-up minute, sampling the server's
resident memory every few seconds; it reports errors, latency and memory growth against the target
(under 10% growth from the end of the warm-up, zero errors).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

from streamrank.config import CONFIG_DIR

PIPELINES = ("bm25", "dense", "hybrid", "e2rank")
"""dense isolates the model stage (query encoding) that batching is meant to speed up."""
CLIENTS = (1, 8, 32)
SECONDS_PER_LEVEL = 12.0
QUICK_REQUESTS_PER_CLIENT = 6
QUICK_DOCS = 1000

SOAK_CLIENTS = 8
SOAK_SECONDS = 600.0
SOAK_WARMUP_SECONDS = 60.0
SOAK_SAMPLE_SECONDS = 5.0
SOAK_PIPELINE = "hybrid"
SOAK_MAX_GROWTH_PCT = 10.0
QUICK_SOAK = {"seconds": 6.0, "warmup_seconds": 2.0, "sample_seconds": 0.5}


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


# ---- the benchmark -----------------------------------------------------------------------------------
def scifact_folder() -> Path:
    from streamrank.eval.datasets import load_dataset

    return load_dataset("scifact").path


def scifact_queries() -> list[str]:
    from streamrank.eval.datasets import load_dataset

    return [q.text for q in load_dataset("scifact").queries("test")]


def quick_corpus(folder: Path) -> Path:
    """A BEIR folder holding the first QUICK_DOCS SciFact documents (queries and qrels as they are)."""
    source = scifact_folder()
    folder.mkdir(parents=True, exist_ok=True)
    with (source / "corpus.jsonl").open() as corpus:
        (folder / "corpus.jsonl").write_text("".join(itertools.islice(corpus, QUICK_DOCS)))
    (folder / "queries.jsonl").write_text((source / "queries.jsonl").read_text())
    (folder / "qrels").mkdir(exist_ok=True)
    for qrels in (source / "qrels").iterdir():
        (folder / "qrels" / qrels.name).write_text(qrels.read_text())
    return folder


def quick_index(work: Path) -> str:
    """Index the first QUICK_DOCS SciFact documents with BM25 under ``work``; the settings lines that use them."""
    from streamrank.config import load_pipeline

    corpus = quick_corpus(work / "scifact-small")
    pipeline = load_pipeline(CONFIG_DIR / "bm25.toml", corpus=str(corpus), index_dir=work / "index")
    pipeline.index()
    pipeline.close()
    return f'corpus = "{corpus}"\nindex_dir = "{work / "index"}"\n'


def run_service_benchmark(output_dir: Path | None = None, quick: bool = False) -> dict[str, Any]:
    """Throughput and p50/p95/p99 latency at 1, 8, 32 clients, per pipeline, with and without batching."""
    with tempfile.TemporaryDirectory(prefix="streamrank-bench-service-") as tmp:
        work = Path(tmp)
        if quick:
            figures = measure(("bm25",), work, quick=True, extra=quick_index(work))
            figures["dataset"] = f"scifact (first {QUICK_DOCS} documents)"
        else:
            figures = measure(PIPELINES, work)
    if output_dir is not None:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "service.md").write_text(markdown_table(figures))
    return figures


def server_settings(pipeline: str, batching: bool, workers: int, torch_threads: int, extra: str = "") -> str:
    """A service settings file serving ``configs/<pipeline>.toml`` (``extra``: more settings lines)."""
    return (
        f'pipelines = ["{CONFIG_DIR / (pipeline + ".toml")}"]\nbatching = {str(batching).lower()}\n'
        f'workers = {workers}\ntorch_threads = {torch_threads}\nlog_level = "warning"\n{extra}'
    )


def measure(
    pipelines: Sequence[str], work: Path, *, quick: bool = False, extra: str = "", workers: int = 1, torch_threads: int = 1
) -> dict[str, Any]:
    """Start one server per pipeline (configs/<name>.toml) and batching mode, drive it, collect rows.

    ``extra`` is appended to each server's settings file (e.g. ``corpus``/``index_dir`` overrides).
    """
    queries = scifact_queries()
    rows: list[dict[str, Any]] = []
    skipped: dict[str, str] = {}
    for name in pipelines:
        for batching in (False, True):
            config = work / f"{name}-{'batched' if batching else 'single'}.toml"
            config.write_text(server_settings(name, batching, workers, torch_threads, extra))
            with ServiceProcess(config) as server:
                try:
                    server.wait_ready(timeout=600)
                except RuntimeError as exc:
                    skipped[name] = str(exc).splitlines()[0]
                    break
                for clients in CLIENTS:
                    before = batch_counts(server.url, name)
                    row = asyncio.run(
                        drive(
                            server.url,
                            clients,
                            queries,
                            requests=clients * QUICK_REQUESTS_PER_CLIENT if quick else None,
                            seconds=None if quick else SECONDS_PER_LEVEL,
                        )
                    )
                    after = batch_counts(server.url, name)
                    batches = after[1] - before[1]
                    row["mean_batch_size"] = round((after[0] - before[0]) / batches, 2) if batches else None
                    rows.append({"pipeline": name, "batching": batching, **row})
                    print(_row_line(rows[-1]), flush=True)
    return {
        "dataset": "scifact",
        "endpoint": "POST /search k=10",
        "server": {"workers": workers, "torch_threads": torch_threads, "batch_window_ms": 5.0, "max_batch_size": 32},
        "rows": rows,
        "speedup_at_32_clients": _speedups(rows),
        "errors": sum(r["errors"] for r in rows),
        "skipped": skipped,
    }


def _speedups(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Throughput with batching / without, at 32 clients, per pipeline."""
    at32 = {(r["pipeline"], r["batching"]): r["throughput_qps"] for r in rows if r["clients"] == 32}
    return {
        name: round(at32[(name, True)] / at32[(name, False)], 2)
        for name, batching in at32
        if batching and at32.get((name, False))
    }


def _row_line(r: dict[str, Any]) -> str:
    mode = "batched" if r["batching"] else "single "
    return (
        f"{r['pipeline']:<7} {mode} clients={r['clients']:>2}  {r['throughput_qps']:8.1f} q/s  "
        f"p50 {r['p50_ms']:8.1f}  p95 {r['p95_ms']:8.1f}  p99 {r['p99_ms']:8.1f} ms  "
        f"batch {r['mean_batch_size']}  errors {r['errors']}"
    )


def markdown_table(figures: dict[str, Any]) -> str:
    lines = [
        f"Service benchmark: {figures['endpoint']} on {figures['dataset']}; server {figures['server']}",
        "",
        "| pipeline | batching | clients | q/s | p50 ms | p95 ms | p99 ms | mean batch | errors |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in figures["rows"]:
        lines.append(
            f"| {r['pipeline']} | {'on' if r['batching'] else 'off'} | {r['clients']} | {r['throughput_qps']} | "
            f"{r['p50_ms']} | {r['p95_ms']} | {r['p99_ms']} | {r['mean_batch_size']} | {r['errors']} |"
        )
    lines += ["", f"Throughput gain from batching at 32 clients: {figures['speedup_at_32_clients']}"]
    lines += [f"Skipped {name}: {why}" for name, why in figures["skipped"].items()]
    return "\n".join(lines) + "\n"


# ---- soak ----------------------------------------------------------------------------------------------
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
