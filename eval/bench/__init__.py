"""`streamrank bench NAME`: benchmarks registered by name, each writing ``NAME.json`` with machine info.

A benchmark is a function ``(output_dir: Path | None, quick: bool, **options) -> dict`` of figures,
imported only when run. ``quick`` asks for small sizes (a smoke run); ``options`` are the few a benchmark
takes by keyword (``service``: ``pipelines``).
"""

from __future__ import annotations

import datetime as dt
import importlib
import importlib.metadata
import inspect
import json
import os
import platform
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from streamrank.compose import import_target
from streamrank.errors import StreamRankError

BENCHMARKS: dict[str, str] = {
    "kernels": "streamrank.eval.bench.kernels:run_kernels_benchmark",
    "kernels-kv": "streamrank.eval.bench.kernels_kv:run_kv_benchmark",
    "kernels-latency": "streamrank.eval.bench.kernels_latency:run_kernels_latency_benchmark",
    "rerank": "streamrank.eval.bench.rerank:run_rerank_benchmark",
    "ppr": "streamrank.eval.bench.ppr:run_ppr_benchmark",
    "service": "streamrank.eval.bench.service:run_service_benchmark",
    "service-ray": "streamrank.eval.bench.service_ray:run_service_ray_benchmark",
    "ray-index": "streamrank.eval.bench.ray_index:run_ray_index_benchmark",
    "soak": "streamrank.eval.bench.soak:run_soak_benchmark",
    "retrieval": "streamrank.eval.bench.retrieval:run_retrieval_benchmark",
    "writes": "streamrank.eval.bench.writes:run_writes_benchmark",
    "published-rerankers": "streamrank.eval.bench.published_rerankers:run_published_rerankers_benchmark",
}

Benchmark = Callable[..., dict[str, Any]]


def benchmark_function(name: str) -> Benchmark:
    """The function registered as ``name``; a StreamRankError names the known ones otherwise."""
    target = BENCHMARKS.get(name)
    if target is None:
        raise StreamRankError(f"unknown benchmark {name!r} (known: {', '.join(sorted(BENCHMARKS))})")
    return import_target(target, f"benchmark {name!r}", StreamRankError)


def machine_info() -> dict[str, Any]:
    """CPU count, platform, Python, torch version and CUDA device (torch is not imported for this)."""
    try:
        torch_version = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        torch_version = None
    cuda_device = None
    torch = sys.modules.get("torch")  # only ask CUDA if the benchmark already loaded torch
    if torch is not None and torch.cuda.is_available():
        cuda_device = torch.cuda.get_device_name(0)
    return {
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch_version,
        "cuda_device": cuda_device,
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }


class _WriteFlag:
    """Wraps a stream and notes whether anything was written through it."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.written = False

    def write(self, text: str) -> int:
        self.written = self.written or bool(text)
        return self.stream.write(text)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


def run_benchmark(
    name: str, output_dir: Path | None = None, quick: bool = False, **options: Any
) -> dict[str, Any]:
    """Run benchmark ``name``; print its figures as JSON unless it printed its own; write ``NAME.json``."""
    function = benchmark_function(name)
    accepted = inspect.signature(function).parameters
    unknown = [key for key in options if key not in accepted]
    if unknown:
        raise StreamRankError(f"benchmark {name!r} takes no {', '.join('--' + k for k in unknown)}")
    out = Path(output_dir) if output_dir is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    flag = _WriteFlag(sys.stdout)
    sys.stdout = flag  # type: ignore[assignment]
    try:
        figures = function(out, quick, **options)
    finally:
        sys.stdout = flag.stream
    payload = {"benchmark": name, "quick": quick, **options, "machine": machine_info(), "results": figures}
    if not flag.written:
        print(json.dumps(figures, indent=2, default=str))
    if out is not None:
        (out / f"{name}.json").write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return payload
