"""Retrieval throughput: index build time and queries/s, one at a time and batched, per pipeline.

Every index is built from scratch in a temporary folder, so build time is measured every run.
Single queries are timed at depth ``k`` and at depth ``DEEP`` (what a fusion stage asks its
retrievers for). ``bm25-stored`` is BM25 with pyserini's full storage (raw JSON and document
vectors) beside the lean default, to show what loading stored fields costs a search.
``quick`` uses the first 500 documents and 32 queries.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Sequence
from itertools import islice
from pathlib import Path
from typing import Any

QUICK_DOCS = 500
QUICK_QUERIES = 32
BATCH = 32
DEEP = 1000
WARM_UP = 20
VARIANTS = {"bm25-stored": ("bm25", {"store": ["positions", "docvectors", "raw"]})}
"""Benchmark-only pipelines: a config in configs/ whose (one, flat) stage gets these options on top."""


def run_retrieval_benchmark(
    output_dir: Path | None,
    quick: bool,
    *,
    dataset: str = "scifact",
    pipelines: Sequence[str] = ("bm25", "bm25-stored", "dense"),
    k: int = 10,
) -> dict[str, Any]:
    """Per pipeline: documents, index seconds, single and batched queries/s at depth ``k``, single at ``DEEP``."""
    from streamrank.compose import load_pipeline
    from streamrank.datasets import load_dataset

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
            config = _variant_config(name, Path(tmp)) if name in VARIANTS else name
            pipe = load_pipeline(config, corpus=dataset, index_dir=Path(tmp) / "index")
            try:
                started = time.perf_counter()
                pipe.index(documents)
                index_s = time.perf_counter() - started
                for text in queries[:WARM_UP]:  # model load, JVM start and JIT: the first pipeline pays them
                    pipe.search(text, k=DEEP)
                started = time.perf_counter()
                for text in queries:
                    pipe.search(text, k=k)
                single_s = time.perf_counter() - started
                started = time.perf_counter()
                for text in queries:
                    pipe.search(text, k=DEEP)
                deep_s = time.perf_counter() - started
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
            f"single_qps_k{DEEP}": round(len(queries) / deep_s, 1),
            "batch_size": BATCH,
        }
    return results


def _variant_config(name: str, folder: Path) -> Path:
    """Write the ``VARIANTS`` pipeline ``name`` as a TOML file in ``folder`` (values as JSON literals)."""
    from streamrank.config import read_config

    base, options = VARIANTS[name]
    (stage,) = read_config(base)[0].stages
    lines = [f"name = {json.dumps(name)}", "[[stages]]"]
    lines += [f"{key} = {json.dumps(value)}" for key, value in {**stage, **options}.items()]
    path = folder / f"{name}.toml"
    path.write_text("\n".join(lines) + "\n")
    return path
