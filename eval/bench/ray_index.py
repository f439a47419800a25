"""`streamrank bench ray-index`: the driver's peak memory of ``streamrank index --ray`` as the corpus grows.

Synthetic BEIR corpora (short random abstracts, fixed seed) of 5,000 documents (twice: the difference
between the two runs is the noise) and 50,000 documents (``quick``: 500 and 5,000) are indexed by a dense MiniLM pipeline with ``streamrank index --ray`` (a local Ray head,
2 encoder actors), each in a fresh driver process that reports its own peak RSS (``ru_maxrss`` of the
driver alone: Ray's head and workers are other processes). Ray Data streams the corpus file, the
workers encode and write each shard's vectors and build the index, so the driver's peak should not
grow with the corpus; the row written beside it says by how much it did. The store-filling step alone
(5,000, 50,000 and 200,000 documents, no Ray) shows what remains: SQLite's page cache, which stops at its
cap.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

STORE_SIZES = (5_000, 50_000, 200_000)
"""Corpus sizes of the store-filling step alone (no Ray, no encoding: seconds)."""
SIZES = (5_000, 5_000, 50_000)
"""The first size runs twice: how much the same run moves is the noise the growth is compared with."""
WORDS = (
    "protein cell gene mouse tumor receptor signal pathway expression clinical trial patient dose risk "
    "vitamin bone fracture insulin glucose neuron cortex memory immune virus vaccine antibody lung heart"
).split()

DRIVER = """
import resource, sys
from streamrank.cli import main
rc = main(sys.argv[1:])
print("PEAK_RSS_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, flush=True)
sys.exit(rc)
"""


STORE_DRIVER = """
import itertools, resource, sys
from streamrank.datasets import load_dataset
from streamrank.service.ray_encode import STORE_CHUNK
from streamrank.store import DocumentStore
store, docs = DocumentStore(sys.argv[2]), load_dataset(sys.argv[1]).corpus()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
while chunk := list(itertools.islice(docs, STORE_CHUNK)):
    store.upsert(chunk)
print("PEAK_RSS_KB", before, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, flush=True)
"""


def synthetic_corpus(folder: Path, size: int, seed: int = 7) -> Path:
    """A BEIR folder of ``size`` documents of 8-16 words (and one query, so it loads as a dataset)."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "corpus.jsonl").open("w") as out:
        for i in range(size):
            text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 16)))
            out.write(json.dumps({"_id": f"d{i}", "title": "", "text": text}) + "\n")
    (folder / "queries.jsonl").write_text(json.dumps({"_id": "q0", "text": "vitamin bone fracture"}) + "\n")
    (folder / "qrels").mkdir(exist_ok=True)
    (folder / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq0\td0\t1\n")
    return folder


def index_once(work: Path, size: int, shards: int) -> dict[str, Any]:
    """One ``streamrank index --ray`` of a fresh ``size``-document corpus into a fresh folder under ``work``."""
    work = Path(tempfile.mkdtemp(prefix=f"run-{size}-", dir=work))
    corpus = synthetic_corpus(work / f"corpus-{size}", size)
    pipeline = work / f"dense-{size}.toml"
    pipeline.write_text(f'name = "dense"\ncorpus = "{corpus}"\nshards = {shards}\n[[stages]]\nkind = "dense"\nk = 10\n')
    command = [sys.executable, "-c", DRIVER, "index", "--ray", "-p", str(pipeline), "--index-dir", str(work / f"index-{size}")]
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(f"streamrank index --ray on {size} documents failed:\n{result.stderr[-3000:]}")
    peak = next(int(line.split()[1]) for line in result.stdout.splitlines() if line.startswith("PEAK_RSS_KB"))
    return {"documents": size, "shards": shards, "driver_peak_rss_mb": round(peak / 1024, 1), "seconds": round(seconds, 1)}


def store_fill_once(work: Path, size: int) -> dict[str, Any]:
    """The driver's first step of ``index --ray`` alone (the corpus streamed into the store in chunks), in a
    fresh process: its peak RSS before and after."""
    work = Path(tempfile.mkdtemp(prefix=f"store-{size}-", dir=work))
    corpus = synthetic_corpus(work / "corpus", size)
    command = [sys.executable, "-c", STORE_DRIVER, str(corpus), str(work / "docs.sqlite")]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    before, after = (int(v) for v in next(x for x in result.stdout.splitlines() if x.startswith("PEAK_RSS_KB")).split()[1:])
    return {"documents": size, "peak_before_mb": round(before / 1024, 1), "peak_after_mb": round(after / 1024, 1),
            "growth_mb": round((after - before) / 1024, 1)}


def run_ray_index_benchmark(output_dir: Path | None = None, quick: bool = False, shards: int = 2) -> dict[str, Any]:
    sizes = tuple(s // 10 for s in SIZES) if quick else SIZES
    with tempfile.TemporaryDirectory(prefix="streamrank-bench-ray-index-") as tmp:
        rows = []
        for size in sizes:
            rows.append(index_once(Path(tmp), size, shards))
            print(rows[-1], flush=True)
        store_rows = [store_fill_once(Path(tmp), size) for size in (STORE_SIZES[:2] if quick else STORE_SIZES)]
    smalls = [r["driver_peak_rss_mb"] for r in rows if r["documents"] == sizes[0]]
    small, large = max(smalls), rows[-1]["driver_peak_rss_mb"]
    figures = {
        "pipeline": f"dense MiniLM, shards = {shards}, streamrank index --ray (2 encoder actors)",
        "rows": rows,
        "peak_growth_mb": round(large - small, 1),
        "peak_ratio": round(large / small, 3),
        "noise_mb": round(max(smalls) - min(smalls), 1),
        "store_fill": store_rows,
    }
    if output_dir is not None:
        output_dir.mkdir(parents=True, exist_ok=True)
        lines = ["| documents | driver peak RSS (MB) | seconds |", "| ---: | ---: | ---: |"]
        lines += [f"| {r['documents']:,} | {r['driver_peak_rss_mb']} | {r['seconds']} |" for r in rows]
        lines += ["", "| documents | store filling: driver peak RSS growth (MB) |", "| ---: | ---: |"]
        lines += [f"| {r['documents']:,} | {r['growth_mb']} |" for r in store_rows]
        (output_dir / "ray-index.md").write_text("\n".join(lines) + "\n")
    return figures
