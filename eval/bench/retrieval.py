"""Retrieval throughput: index build time and queries/s, one at a time and batched, per pipeline.

Every index is built from scratch in a temporary folder, so build time is measured every run.
``quick`` uses the first 500 documents and 32 queries.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Sequence
from itertools import islice
from pathlib import Path
from typing import Any

QUICK_DOCS = 500
QUICK_QUERIES = 32
BATCH = 32


def run_retrieval_benchmark(
    output_dir: Path | None,
    quick: bool,
    *,
    dataset: str = "scifact",
    pipelines: Sequence[str] = ("bm25", "dense"),
    k: int = 10,
) -> dict[str, Any]:
    """Per pipeline: documents, index seconds, single and batched queries/s at depth ``k``."""
    from streamrank.config import load_pipeline
    from streamrank.eval.datasets import load_dataset

    data = load_dataset(dataset)
    documents = list(islice(data.corpus(), QUICK_DOCS if quick else None))
    queries = [q.text for q in data.queries("test")][: QUICK_QUERIES if quick else None]
    results: dict[str, Any] = {
        "dataset": data.name,
        "documents": len(documents),
        "queries": len(queries),
        "k": k,
    }
    for name in pipelines:
        with tempfile.TemporaryDirectory(prefix=f"bench-{name}-") as tmp:
            pipe = load_pipeline(name, corpus=dataset, index_dir=Path(tmp))
            try:
                started = time.perf_counter()
                pipe.index(documents)
                index_s = time.perf_counter() - started
                pipe.search(queries[0], k=k)  # warm-up: model load, JVM start
                started = time.perf_counter()
                for text in queries:
                    pipe.search(text, k=k)
                single_s = time.perf_counter() - started
                started = time.perf_counter()
                for i in range(0, len(queries), BATCH):
                    pipe.search_batch(queries[i : i + BATCH], k=k)
                batched_s = time.perf_counter() - started
            finally:
                pipe.close()
        results[name] = {
            "index_seconds": round(index_s, 3),
            "single_qps": round(len(queries) / single_s, 1),
            "batched_qps": round(len(queries) / batched_s, 1),
            "batch_size": BATCH,
        }
    return results
