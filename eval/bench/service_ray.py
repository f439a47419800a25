"""`streamrank bench service --ray`: the service on Ray Serve beside the in-process server, in one run.

1. Throughput and p50/p95/p99 at 1, 8 and 32 clients (closed loop, ``POST /search`` k=10, SciFact
   test queries) for each pipeline, served three ways: in process (batching on), on Ray Serve with 1
   pipeline replica and with 2 (``serve.batch`` with the same bounds; a local head started by
   ``streamrank serve --ray``). Every server gets one worker and one torch thread per process.
2. Scatter-gather: a dense flat index over SciFact as one index and as 4 shards (vectors shared,
   rankings identical), one client, k=10 and k=1000, on the in-process server (shards searched one
   after another) and on Ray (one actor per shard). Reported: the dense stage's own time from the
   answer's ``timings_ms`` (query encoding, the shard calls and the merge) and the client's latency.

It needs the SciFact BM25 and dense indexes under ``$STREAMRANK_HOME/indexes/scifact``; the
4-shard split is written into a temporary copy. ``quick`` runs BM25 on 1,000 documents, and the
scatter-gather over BM25 (no dense index needed). On a 2-core machine the replicas, the ingress
and the shard actors share the same two cores: see BENCHMARKS.md for what that can and cannot show.
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

from streamrank.eval.bench.service import (
    CLIENTS,
    drive_level,
    quick_index,
    scifact_queries,
)
from streamrank.eval.bench.service_load import ServiceProcess

PIPELINES = ("bm25", "dense", "hybrid")
MODES: tuple[tuple[str, int | None], ...] = (("in process", None), ("ray 1 replica", 1), ("ray 2 replicas", 2))
SCATTER_QUERIES = 40


def ray_table(replicas: int) -> str:
    return (
        f"[ray]\nreplicas = {replicas}\nnum_cpus = 0.5\n"
        "ingress = {num_cpus = 0.25}\nwriter = {num_cpus = 0.25}\nshard = {num_cpus = 0.1}\n"
    )


def settings_file(path: Path, pipelines: list[str], mode: int | None, extra: str) -> Path:
    listed = ", ".join(f'"{p}"' for p in pipelines)
    body = f'pipelines = [{listed}]\nworkers = 1\ntorch_threads = 1\nlog_level = "warning"\n{extra}'
    path.write_text(body + (ray_table(mode) if mode is not None else ""))
    return path


def throughput(
    pipelines: tuple[str, ...], work: Path, extra: str, quick: bool, modes: tuple[tuple[str, int | None], ...] = MODES
) -> tuple[list[dict[str, Any]], dict[str, str]]:
    from streamrank.config import CONFIG_DIR

    queries = scifact_queries()
    rows: list[dict[str, Any]] = []
    skipped: dict[str, str] = {}
    for name in pipelines:
        for mode_name, replicas in modes:
            config = settings_file(work / f"{name}-{replicas or 0}.toml", [str(CONFIG_DIR / f"{name}.toml")], replicas, extra)
            with ServiceProcess(config) as server:
                try:
                    server.wait_ready(timeout=900)
                except RuntimeError as exc:
                    skipped[f"{name} ({mode_name})"] = str(exc).splitlines()[0]
                    continue
                for clients in CLIENTS:
                    row = drive_level(server.url, name, clients, queries, quick)
                    rows.append({"pipeline": name, "mode": mode_name, **row})
                    print(
                        f"{name:<7} {mode_name:<15} clients={clients:>2} {row['throughput_qps']:8.1f} q/s "
                        f"p50 {row['p50_ms']:8.1f} p99 {row['p99_ms']:8.1f} ms batch {row['mean_batch_size']} "
                        f"errors {row['errors']}",
                        flush=True,
                    )
    return rows, skipped


def shard_pipelines(work: Path, kind: str, source_index: Path) -> tuple[list[str], Path]:
    """One-index and 4-shard pipeline files of ``kind`` over a private copy of ``source_index``."""
    from streamrank.compose import load_pipeline

    index = work / "scatter-index"
    index.mkdir(parents=True)
    shutil.copy2(source_index / "docs.sqlite", index / "docs.sqlite")
    shutil.copytree(source_index / kind, index / kind)
    paths = []
    for shards in (1, 4):
        path = work / f"{kind}-s{shards}.toml"
        path.write_text(f'name = "{kind}-s{shards}"\nshards = {shards}\n[[stages]]\nkind = "{kind}"\nk = 1000\n')
        pipeline = load_pipeline(path, index_dir=index)
        pipeline.index()  # the 4-shard split reuses the copied index's vectors (no encoding)
        pipeline.close()
        paths.append(str(path))
    return paths, index


def scatter_gather(work: Path, kind: str, source_index: Path) -> list[dict[str, Any]]:
    paths, index = shard_pipelines(work, kind, source_index)
    queries = scifact_queries()[:SCATTER_QUERIES]
    rows: list[dict[str, Any]] = []
    for mode_name, replicas in (MODES[0], MODES[1]):
        config = settings_file(work / f"scatter-{replicas or 0}.toml", paths, replicas, f'index_dir = "{index}"\n')
        with ServiceProcess(config) as server:
            server.wait_ready(timeout=900)
            for k in (10, 1000):
                for shards in (1, 4):
                    rows.append({"mode": mode_name, "k": k, "shards": shards, **timed(server.url, f"{kind}-s{shards}", kind, k, queries)})
                    print(f"scatter {mode_name:<15} k={k:<5} shards={shards} {rows[-1]}", flush=True)
    return rows


def timed(url: str, pipeline: str, stage: str, k: int, queries: list[str]) -> dict[str, Any]:
    stage_ms: list[float] = []
    total_ms: list[float] = []
    with httpx.Client(base_url=url, timeout=120) as client:
        for i, query in enumerate([queries[0], *queries]):
            started = time.perf_counter()
            reply = client.post("/search", json={"query": query, "k": k, "pipeline": pipeline})
            reply.raise_for_status()
            if i:  # the first one warms up
                total_ms.append((time.perf_counter() - started) * 1000.0)
                stage_ms.append(reply.json()["timings_ms"][stage])
    return {
        "stage_p50_ms": round(statistics.median(stage_ms), 2),
        "total_p50_ms": round(statistics.median(total_ms), 2),
        "queries": len(stage_ms),
    }


def run_service_ray_benchmark(
    output_dir: Path | None = None, quick: bool = False, pipelines: Sequence[str] | None = None
) -> dict[str, Any]:
    """``pipelines`` (``--pipelines hybrid``): only their throughput rows, in process and on Ray with one
    pipeline replica (no scatter-gather part)."""
    from streamrank.models import cache_home

    with tempfile.TemporaryDirectory(prefix="streamrank-bench-ray-") as tmp:
        work = Path(tmp)
        extra = quick_index(work) if quick else ""
        chosen = tuple(pipelines or (("bm25",) if quick else PIPELINES))
        rows, skipped = throughput(chosen, work, extra, quick, MODES[:2] if pipelines else MODES)
        scatter: list[dict[str, Any]] = []
        kind, source = ("bm25", work / "index") if quick else ("dense", cache_home() / "indexes" / "scifact")
        if not pipelines:
            scatter = scatter_gather(work / "scatter", kind, source)
    figures = {
        "dataset": "scifact" + (" (first 1000 documents)" if quick else ""),
        "endpoint": "POST /search k=10",
        "server": {"workers": 1, "torch_threads": 1, "ray": ray_table(1).replace("\n", " ").strip()},
        "rows": rows,
        "scatter_gather": {"kind": kind, "rows": scatter},
        "errors": sum(r["errors"] for r in rows),
        "skipped": skipped,
    }
    if output_dir is not None:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "service-ray.md").write_text(markdown_table(figures))
    return figures


def markdown_table(figures: dict[str, Any]) -> str:
    lines = [
        f"Service on Ray vs in process: {figures['endpoint']} on {figures['dataset']}; {figures['server']}", "",
        "| pipeline | served | clients | q/s | p50 ms | p95 ms | p99 ms | mean batch | errors |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in figures["rows"]:
        lines.append(
            f"| {r['pipeline']} | {r['mode']} | {r['clients']} | {r['throughput_qps']} | {r['p50_ms']} | "
            f"{r['p95_ms']} | {r['p99_ms']} | {r['mean_batch_size']} | {r['errors']} |"
        )
    sg = figures["scatter_gather"]
    lines += [
        "", f"Scatter-gather, {sg['kind']} (1 client, p50 over {SCATTER_QUERIES} queries):", "",
        "| served | k | shards | stage ms | request ms |", "| --- | ---: | ---: | ---: | ---: |",
    ]
    lines += [f"| {r['mode']} | {r['k']} | {r['shards']} | {r['stage_p50_ms']} | {r['total_p50_ms']} |" for r in sg["rows"]]
    lines += [f"Skipped {name}: {why}" for name, why in figures["skipped"].items()]
    return "\n".join(lines) + "\n"
