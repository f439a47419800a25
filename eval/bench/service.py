"""`streamrank bench service`: throughput and latency of the real server, with and without micro-batching.

For each pipeline (BM25, dense, hybrid, PPR over SciFact) and each batching mode, a fresh server is
started with ``streamrank serve`` on 127.0.0.1 (a free port), then 1, 8 and 32 concurrent
clients (httpx, asyncio, closed loop: each sends its next query when the last one is answered)
send SciFact test queries to ``/search``. Reported per cell: throughput, p50/p95/p99 latency,
errors, and the mean batch size the server formed (from its /metrics).

The full run uses the SciFact indexes under ``$STREAMRANK_HOME/indexes/scifact`` (build them with
``streamrank index -p configs/<name>.toml``); a pipeline whose server does not become ready is
reported under ``skipped`` with the server's reason. ``quick`` indexes the first 1,000 SciFact
documents with BM25 into a temporary folder and sends fewer requests: a smoke run.

`streamrank bench soak` lives in ``soak.py``; it uses this module's settings-file writer and quick index.
"""

from __future__ import annotations

import asyncio
import itertools
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from streamrank.config import CONFIG_DIR
from streamrank.errors import StreamRankError
from streamrank.eval.bench.service_load import ServiceProcess, batch_counts, drive

PIPELINES = ("bm25", "dense", "hybrid", "ppr")
"""dense isolates the model stage (query encoding) that batching is meant to speed up."""
CLIENTS = (1, 8, 32)
SECONDS_PER_LEVEL = 12.0
QUICK_REQUESTS_PER_CLIENT = 6
QUICK_DOCS = 1000


def scifact_folder() -> Path:
    from streamrank.datasets import load_dataset

    return load_dataset("scifact").path


def scifact_queries() -> list[str]:
    from streamrank.datasets import load_dataset

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
    from streamrank.compose import load_pipeline

    corpus = quick_corpus(work / "scifact-small")
    pipeline = load_pipeline(CONFIG_DIR / "bm25.toml", corpus=str(corpus), index_dir=work / "index")
    pipeline.index()
    pipeline.close()
    return f'corpus = "{corpus}"\nindex_dir = "{work / "index"}"\n'


def run_service_benchmark(
    output_dir: Path | None = None, quick: bool = False, pipelines: Sequence[str] | None = None
) -> dict[str, Any]:
    """Throughput and p50/p95/p99 latency at 1, 8, 32 clients, per pipeline, with and without batching;
    beside them (full runs) each pipeline's SciFact nDCG@10 as served (top 10) and as evaluated."""
    names = tuple(pipelines or (("bm25",) if quick else PIPELINES))
    missing = [n for n in names if not config_path(n).is_file()]
    if missing:
        raise StreamRankError(f"bench service: no pipeline file {', '.join(missing)} (a name in {CONFIG_DIR} or a path)")
    with tempfile.TemporaryDirectory(prefix="streamrank-bench-service-") as tmp:
        work = Path(tmp)
        if quick:
            figures = measure(names, work, quick=True, extra=quick_index(work))
            figures["dataset"] = f"scifact (first {QUICK_DOCS} documents)"
        else:
            figures = measure(names, work)
            figures["quality"] = serving_quality(names, work)
    if output_dir is not None:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "service.md").write_text(markdown_table(figures))
    return figures


def config_path(pipeline: str) -> Path:
    """``configs/<pipeline>.toml`` of the package, or ``pipeline`` itself when it is a ``.toml`` path."""
    return Path(pipeline) if pipeline.endswith(".toml") else CONFIG_DIR / f"{pipeline}.toml"


def label(pipeline: str) -> str:
    """How a pipeline is named in the tables (a file's stem)."""
    return Path(pipeline).stem


def serving_quality(pipelines: Sequence[str], work: Path) -> dict[str, dict[str, float]]:
    """SciFact test nDCG@10 per pipeline as a request for the top 10 gets it and at full depth (eval)."""
    from streamrank.eval.runner import run_eval

    quality: dict[str, dict[str, float]] = {}
    for pipeline in pipelines:
        config, name = config_path(pipeline), label(pipeline)
        served = run_eval("scifact", config, work / f"eval-{name}-top10", batch_size=16, top=10)
        evaluated = run_eval("scifact", config, work / f"eval-{name}-full", batch_size=16)
        quality[name] = {
            "served_top10": round(served["metrics"]["nDCG@10"], 4),
            "evaluated": round(evaluated["metrics"]["nDCG@10"], 4),
        }
        print(f"{name:<7} SciFact nDCG@10 served {quality[name]['served_top10']}  evaluated {quality[name]['evaluated']}")
    return quality


def server_settings(pipeline: str, batching: bool, workers: int, torch_threads: int, extra: str = "") -> str:
    """A service settings file serving ``configs/<pipeline>.toml`` (``extra``: more settings lines)."""
    return (
        f'pipelines = ["{config_path(pipeline)}"]\nbatching = {str(batching).lower()}\n'
        f'workers = {workers}\ntorch_threads = {torch_threads}\nlog_level = "warning"\n{extra}'
    )


def measure(
    pipelines: Sequence[str], work: Path, *, quick: bool = False, extra: str = "", workers: int = 1, torch_threads: int = 1
) -> dict[str, Any]:
    """Start one server per pipeline (a name in configs/ or a path) and batching mode, drive it, collect rows.

    ``extra`` is appended to each server's settings file (e.g. ``corpus``/``index_dir`` overrides).
    """
    queries = scifact_queries()
    rows: list[dict[str, Any]] = []
    skipped: dict[str, str] = {}
    from streamrank.config import read_config

    for pipeline in pipelines:
        name, served_as = label(pipeline), read_config(config_path(pipeline))[0].name
        for batching in (False, True):
            config = work / f"{name}-{'batched' if batching else 'single'}.toml"
            config.write_text(server_settings(pipeline, batching, workers, torch_threads, extra))
            with ServiceProcess(config) as server:
                try:
                    server.wait_ready(timeout=600)
                except RuntimeError as exc:
                    skipped[name] = str(exc).splitlines()[0]
                    break
                for clients in CLIENTS:
                    row = drive_level(server.url, served_as, clients, queries, quick)
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


def drive_level(url: str, pipeline: str, clients: int, queries: Sequence[str], quick: bool) -> dict[str, Any]:
    """One client level against a running server: throughput and latency, and the mean batch the server
    formed for ``pipeline`` meanwhile (from its /metrics)."""
    before = batch_counts(url, pipeline)
    row = asyncio.run(
        drive(
            url,
            clients,
            queries,
            requests=clients * QUICK_REQUESTS_PER_CLIENT if quick else None,
            seconds=None if quick else SECONDS_PER_LEVEL,
        )
    )
    after = batch_counts(url, pipeline)
    batches = after[1] - before[1]
    row["mean_batch_size"] = round((after[0] - before[0]) / batches, 2) if batches else None
    return row


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
    if figures.get("quality"):
        lines += ["", "| pipeline | SciFact nDCG@10 served (top 10) | at full depth (eval) |", "| --- | ---: | ---: |"]
        lines += [f"| {n} | {q['served_top10']} | {q['evaluated']} |" for n, q in figures["quality"].items()]
    return "\n".join(lines) + "\n"
