"""`streamrank bench writes`: what a write costs as the corpus grows (issue 24), beside two peers.

For each corpus size (10k, 100k, 1M synthetic documents; ``--sizes``) and each pipeline (``dense``,
``hybrid``; ``--pipelines``; ``graph``: the ppr stage's corpus graph alone) it builds an index in a scratch folder and measures through
``Pipeline.add_documents`` / ``delete_documents`` (the service's write path, durable when it returns):
p50/p99 of a 1-document and a 100-document upsert and of a 1-document delete, 8 concurrent writers,
search p50 idle and during a sustained write burst, search p50 after 30% of the documents are deleted
(before compaction), compaction time and disk used before/after it.

Vectors: the real encoder (all-MiniLM-L6-v2, 384-d) for corpora up to 10k documents; above that a
deterministic stand-in encoder (:class:`StandInEncoder`: a fixed Gaussian random projection of the
bag of words, normalised; same dimension), said in the output. Writes and searches are timed with
the vectors computed beforehand (``DenseRetriever.supply_embeddings`` and the query vectors looked up),
so every size times the same write path and no size pays for encoding.

Peers on the same vectors (``pip install streamrank[bench]``): LanceDB (no vector index: exact scan)
and Chroma (its HNSW, the only index it has). How each makes a write durable is in ``durability``.
"""

from __future__ import annotations

import gc
import logging
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from functools import partial
from itertools import cycle, islice
from pathlib import Path
from typing import Any

from streamrank.types import Document

log = logging.getLogger("streamrank.bench.writes")

SIZES = (10_000, 100_000, 1_000_000)
QUICK_SIZES = (1_000, 5_000)
REAL_ENCODER_UP_TO = 10_000
DIM = 384
VOCAB = 20_000
SEED = 24
PEER_DURABILITY = {
    "lancedb": "each write commits a new data fragment and a new table version (temp file + rename through "
    "Lance's object store); strace shows no fsync or fdatasync during a merge_insert, so a write is "
    "acknowledged before it is on disk: it survives a process crash, not a power failure (not durable)",
    "chromadb": "each write is committed to its SQLite log (chroma.sqlite3) before it returns; strace shows 8 "
    "fsync calls per 1-document upsert (durable); the HNSW segment is built from that log later",
    "streamrank": "each write is committed in the SQLite store (WAL, synchronous=FULL) and appended to every "
    "index (the dense segment log with fsync, a Lucene commit) before it is acknowledged (durable)",
}


# ---- data --------------------------------------------------------------------------------------------
def _vocabulary() -> list[str]:
    import numpy as np

    rng = np.random.default_rng(SEED)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    words = {"".join(rng.choice(letters, size=int(rng.integers(4, 10)))) for _ in range(VOCAB * 2)}
    return sorted(words)[:VOCAB]


class SyntheticCorpus:
    """``n`` documents of 10-30 Zipf-distributed pseudo-words (ids ``d0000000``...), deterministic."""

    def __init__(self, n: int, seed: int = SEED) -> None:
        import numpy as np

        self.words = _vocabulary()
        rng = np.random.default_rng(seed + n)
        lengths = rng.integers(10, 30, size=n)
        ranks = np.arange(1, VOCAB + 1)
        weights = 1.0 / ranks**1.05
        self.tokens = rng.choice(VOCAB, size=int(lengths.sum()), p=weights / weights.sum())
        self.offsets = np.concatenate([[0], np.cumsum(lengths)])
        self.n = n

    def text(self, i: int) -> str:
        return " ".join(self.words[t] for t in self.tokens[self.offsets[i] : self.offsets[i + 1]])

    def document(self, i: int, prefix: str = "d") -> Document:
        return Document(id=f"{prefix}{i:07d}", text=self.text(i))

    def documents(self, prefix: str = "d", start: int = 0, stop: int | None = None) -> Iterator[Document]:
        for i in range(start, self.n if stop is None else stop):
            yield self.document(i, prefix)


class StandInEncoder:
    """Deterministic stand-in for a sentence encoder: each vocabulary word gets a fixed Gaussian vector
    (seeded), a text is the normalised sum of its words' vectors. Texts sharing words are similar, so
    searches behave like searches; it costs a sparse matrix product instead of a transformer."""

    name = f"stand-in (Gaussian random projection of the bag of words, {DIM}-d, seed {SEED})"

    def __init__(self, words: Sequence[str], dim: int = DIM) -> None:
        import numpy as np

        self.index = {w: i for i, w in enumerate(words)}
        self.matrix = np.random.default_rng(SEED).standard_normal((len(words), dim)).astype(np.float32)

    def encode_tokens(self, tokens: Any, offsets: Any) -> Any:
        import numpy as np
        from scipy import sparse

        n = len(offsets) - 1
        out = np.empty((n, self.matrix.shape[1]), dtype=np.float32)
        for start in range(0, n, 50_000):
            stop = min(n, start + 50_000)
            lo, hi = offsets[start], offsets[stop]
            counts = sparse.csr_matrix(
                (np.ones(hi - lo, dtype=np.float32), tokens[lo:hi], offsets[start : stop + 1] - lo),
                shape=(stop - start, self.matrix.shape[0]),
            )
            out[start:stop] = counts @ self.matrix
        out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
        return out

    def encode(self, texts: Sequence[str]) -> Any:
        import numpy as np

        rows = [[self.index[w] for w in t.split() if w in self.index] for t in texts]
        offsets = np.concatenate([[0], np.cumsum([len(r) for r in rows])]).astype(np.int64)
        tokens = np.fromiter((t for r in rows for t in r), dtype=np.int64, count=int(offsets[-1]))
        return self.encode_tokens(tokens, offsets)


# ---- timing ------------------------------------------------------------------------------------------
def _summary(latencies: list[float]) -> dict[str, float]:
    from streamrank.eval.bench.service_load import percentile

    ordered = sorted(latencies)
    return {
        "n": len(ordered),
        "p50_ms": round(1000 * percentile(ordered, 50), 3),
        "p99_ms": round(1000 * percentile(ordered, 99), 3),
    }


def _timed(operations: Iterator[Callable[[], Any]], budget_s: float, at_least: int = 5) -> dict[str, float]:
    """Run operations one after another until they run out or ``budget_s`` passed (after ``at_least``)."""
    latencies: list[float] = []
    deadline = time.perf_counter() + budget_s
    for op in operations:
        started = time.perf_counter()
        op()
        latencies.append(time.perf_counter() - started)
        if len(latencies) >= at_least and time.perf_counter() > deadline:
            break
    return _summary(latencies)


def _concurrent(make_op: Callable[[int, int], Callable[[], Any]], writers: int, each: int) -> dict[str, float]:
    """``writers`` threads each running ``each`` operations; per-operation latency and throughput."""
    latencies: list[float] = []
    guard = threading.Lock()

    def worker(w: int) -> None:
        mine = []
        for i in range(each):
            op = make_op(w, i)
            started = time.perf_counter()
            op()
            mine.append(time.perf_counter() - started)
        with guard:
            latencies.extend(mine)

    started = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(w,)) for w in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    return {**_summary(latencies), "writers": writers, "ops_per_s": round(len(latencies) / wall, 1)}


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


# ---- our pipelines -----------------------------------------------------------------------------------
class Vectors:
    """Document and query vectors of one run, looked up by id / text (the encoder already ran)."""

    def __init__(self) -> None:
        self.docs: dict[str, Any] = {}
        self.queries: dict[str, Any] = {}

    def query_encoder(self, fallback: Callable[[Sequence[str]], Any]) -> Callable[[Sequence[str]], Any]:
        import numpy as np

        def encode(texts: Sequence[str]) -> Any:
            if all(t in self.queries for t in texts):
                return np.stack([self.queries[t] for t in texts])
            return fallback(texts)

        return encode


def _dense_stage(pipeline: Any) -> Any:
    from streamrank.index.dense import DenseRetriever

    return next(s for s in pipeline.iter_stages() if isinstance(s, DenseRetriever))


@contextmanager
def _supplied(pipeline: Any, vectors: Vectors) -> Iterator[None]:
    with _dense_stage(pipeline).supply_embeddings(vectors.docs):
        yield


def _measure_pipeline(
    name: str, work: Path, corpus: SyntheticCorpus, vectors: Vectors, fresh: SyntheticCorpus, queries: list[str],
    budget_s: float, deletes: bool,
) -> dict[str, Any]:
    """Build ``name`` over the corpus in ``work`` and time its writes and searches."""
    import numpy as np

    from streamrank.compose import load_pipeline

    pipeline = load_pipeline(name, index_dir=work, corpus="")
    dense = _dense_stage(pipeline)
    dense.encode_queries = vectors.query_encoder(dense.encode_queries)  # type: ignore[method-assign]
    out: dict[str, Any] = {}
    try:
        started = time.perf_counter()
        with _supplied(pipeline, vectors):
            pipeline.context.store.upsert(corpus.documents())
            pipeline.index()
        out["build_s"] = round(time.perf_counter() - started, 1)
        out["disk_bytes_built"] = folder_bytes(work)
        search = lambda q: (lambda: pipeline.search(q, k=10))  # noqa: E731
        out["search_idle"] = _timed((search(q) for q in queries * 3), budget_s)
        counter = cycle(range(fresh.n))  # a long run writes some documents again (replacements)

        def upsert(size: int) -> Callable[[], None]:
            docs = [fresh.document(next(counter), "n") for _ in range(size)]
            return lambda: pipeline.add_documents(docs)

        rng = np.random.default_rng(SEED)
        victims = iter(int(i) for i in rng.permutation(corpus.n))
        delete = lambda: (lambda: pipeline.delete_documents([f"d{next(victims):07d}"]))  # noqa: E731
        with _supplied(pipeline, vectors):
            for _ in range(3):  # warm up the write path
                upsert(1)()
            out["upsert_1"] = _timed((upsert(1) for _ in range(200)), budget_s)
            out["upsert_100"] = _timed((upsert(100) for _ in range(50)), budget_s)
            out["delete_1"] = _timed((delete() for _ in range(200)), budget_s)
            out["upsert_1_concurrent"] = _concurrent(lambda w, i: upsert(1), 8, 10)
            out.update(_search_during_burst(pipeline, queries, upsert))
            if deletes:
                out.update(_after_deletes(name, pipeline, dense, vectors, corpus, victims, queries, work, budget_s))
        out["state"] = {k: v for k, v in dense.manifest()["info"].items() if isinstance(v, int | float | str)}
    finally:
        pipeline.close()
    return out


def _paired(arms: dict[str, Callable[[str], Any]], queries: list[str], rounds: int = 6) -> dict[str, dict[str, float]]:
    """Search latency of each arm, measured in alternating blocks of the same queries, so that a change
    of load on the machine weighs on every arm alike. ``arms``: name -> search function."""
    latencies: dict[str, list[float]] = {name: [] for name in arms}
    for _ in range(rounds):
        for name, search in arms.items():
            for q in queries:
                started = time.perf_counter()
                search(q)
                latencies[name].append(time.perf_counter() - started)
    return {name: _summary(values) for name, values in latencies.items()}


def _search_during_burst(pipeline: Any, queries: list[str], upsert: Callable[[int], Callable[[], None]]) -> dict[str, Any]:
    """Search p50 while one thread upserts 1 document after another, against idle, in alternating blocks."""
    writes = [0]
    burst: dict[str, Any] = {}

    def stop_burst() -> None:
        if burst:
            burst["stop"].set()
            burst.pop("thread").join()
            burst.clear()

    def search_idle(q: str) -> None:
        stop_burst()
        pipeline.search(q, k=10)

    def search_burst(q: str) -> None:
        if not burst:
            stop = threading.Event()

            def writer() -> None:
                while not stop.is_set():
                    upsert(1)()
                    writes[0] += 1

            burst.update(stop=stop, thread=threading.Thread(target=writer))
            burst["thread"].start()
            time.sleep(0.05)
        pipeline.search(q, k=10)

    try:
        figures = _paired({"idle": search_idle, "burst": search_burst}, queries[:20])
    finally:
        stop_burst()
    return {"search_idle_paired": figures["idle"], "search_during_burst": {**figures["burst"], "writes_meanwhile": writes[0]}}


def _after_deletes(name: str, pipeline: Any, dense: Any, vectors: Vectors, corpus: SyntheticCorpus,
                   victims: Iterator[int], queries: list[str], work: Path, budget_s: float) -> dict[str, Any]:
    """Delete 30% of the corpus (compaction held back where the index can) and search, beside a freshly
    compacted copy of the index as it was before the deletions (alternating); then compact."""
    from streamrank.compose import load_pipeline

    out: dict[str, Any] = {}
    held = _hold_compaction(dense)
    fresh_dir = work.with_name(work.name + "-fresh")
    if held:
        dense.wait_for_compaction()
        shutil.rmtree(fresh_dir, ignore_errors=True)
        shutil.copytree(work, fresh_dir)
        fresh = load_pipeline(name, index_dir=fresh_dir, corpus="")
        fresh_dense = _dense_stage(fresh)
        fresh_dense.encode_queries = vectors.query_encoder(fresh_dense.encode_queries)  # type: ignore[method-assign]
        fresh_dense.config.auto_compact = False
        fresh_dense.compact()
    started = time.perf_counter()
    target = int(0.3 * corpus.n)
    batch: list[str] = []
    for _ in range(target - 200):  # 200 single deletes were timed already
        batch.append(f"d{next(victims):07d}")
        if len(batch) == 1000:
            pipeline.delete_documents(batch)
            batch = []
    if batch:
        pipeline.delete_documents(batch)
    out["delete_30pct_s"] = round(time.perf_counter() - started, 1)
    if held:
        try:
            paired = _paired({"deleted": lambda q: pipeline.search(q, k=10), "fresh": lambda q: fresh.search(q, k=10)},
                             queries[:20])
        finally:
            fresh.close()
            shutil.rmtree(fresh_dir, ignore_errors=True)
        out["search_after_30pct_deleted"], out["search_fresh_paired"] = paired["deleted"], paired["fresh"]
    else:
        out["search_after_30pct_deleted"] = _timed((lambda q=q: pipeline.search(q, k=10) for q in queries * 3), budget_s)
    out["disk_bytes_before_compaction"] = folder_bytes(work)
    if held:
        started = time.perf_counter()
        dense.compact()
        out["compaction_s"] = round(time.perf_counter() - started, 2)
        out["disk_bytes_after_compaction"] = folder_bytes(work)
        out["search_after_compaction"] = _timed((lambda q=q: pipeline.search(q, k=10) for q in queries * 3), budget_s)
    else:
        out["compaction"] = "this code compacts inside a write (no separate compaction step)"
    return out


def _hold_compaction(dense: Any) -> bool:
    """Keep background compaction from running (False when the index has no separate compaction)."""
    if not hasattr(dense, "compact"):
        return False
    dense.config.auto_compact = False
    return True


# ---- peers -------------------------------------------------------------------------------------------
def _lancedb(work: Path, ids: list[str], matrix: Any, new: Any, queries: Any, budget_s: float) -> dict[str, Any]:
    import lancedb
    import numpy as np
    import pyarrow as pa

    def table(rows_ids: Sequence[str], rows: Any) -> pa.Table:
        flat = pa.array(np.ascontiguousarray(rows, dtype=np.float32).reshape(-1))
        return pa.table({"id": pa.array(list(rows_ids)), "vector": pa.FixedSizeListArray.from_arrays(flat, DIM)})

    db = lancedb.connect(str(work / "lancedb"))
    started = time.perf_counter()
    tbl = db.create_table("docs", table(ids[:100_000], matrix[:100_000]))
    for start in range(100_000, len(ids), 100_000):
        tbl.add(table(ids[start : start + 100_000], matrix[start : start + 100_000]))
    tbl.create_scalar_index("id")
    out: dict[str, Any] = {"build_s": round(time.perf_counter() - started, 1)}
    counter = cycle(range(len(new)))

    def upsert(size: int) -> Callable[[], None]:
        rows = [next(counter) for _ in range(size)]
        data = table([f"n{i:07d}" for i in rows], new[rows])
        return lambda: tbl.merge_insert("id").when_matched_update_all().when_not_matched_insert_all().execute(data)

    victims = iter(np.random.default_rng(SEED).permutation(len(ids)))
    out["upsert_1"] = _timed((upsert(1) for _ in range(100)), budget_s)
    out["upsert_100"] = _timed((upsert(100) for _ in range(30)), budget_s)
    out["delete_1"] = _timed((partial(tbl.delete, f"id = '{ids[i]}'") for i in islice(victims, 100)), budget_s)
    out["search_exact_top10"] = _timed(
        ((lambda q=q: tbl.search(q).distance_type("dot").limit(10).to_list()) for q in queries), budget_s
    )
    out["durability"] = PEER_DURABILITY["lancedb"]
    return out


def _chromadb(work: Path, ids: list[str], matrix: Any, new: Any, queries: Any, budget_s: float) -> dict[str, Any]:
    import chromadb
    import numpy as np
    from chromadb.config import Settings

    client = chromadb.PersistentClient(path=str(work / "chroma"), settings=Settings(anonymized_telemetry=False))
    col = client.create_collection("docs", metadata={"hnsw:space": "ip"})
    step = min(5000, client.get_max_batch_size())
    started = time.perf_counter()
    for start in range(0, len(ids), step):
        col.add(ids=ids[start : start + step], embeddings=matrix[start : start + step])
    out: dict[str, Any] = {"build_s": round(time.perf_counter() - started, 1)}
    counter = cycle(range(len(new)))

    def upsert(size: int) -> Callable[[], None]:
        rows = [next(counter) for _ in range(size)]
        return lambda: col.upsert(ids=[f"n{i:07d}" for i in rows], embeddings=new[rows])

    victims = iter(np.random.default_rng(SEED).permutation(len(ids)))
    out["upsert_1"] = _timed((upsert(1) for _ in range(100)), budget_s)
    out["upsert_100"] = _timed((upsert(100) for _ in range(30)), budget_s)
    out["delete_1"] = _timed((partial(col.delete, ids=[ids[i]]) for i in islice(victims, 100)), budget_s)
    out["search_top10_hnsw"] = _timed(
        ((lambda q=q: col.query(query_embeddings=[q], n_results=10)) for q in queries), budget_s
    )
    out["durability"] = PEER_DURABILITY["chromadb"]
    out["note"] = "Chroma searches its HNSW index only (approximate; no exact mode)"
    return out


PEERS = {"lancedb": _lancedb, "chromadb": _chromadb}


# ---- the benchmark -----------------------------------------------------------------------------------
def _measure_graph(work: Path, corpus: SyntheticCorpus, vectors: Vectors, fresh: SyntheticCorpus, budget_s: float) -> dict[str, Any]:
    """The corpus graph (``ppr`` stage, 10 neighbours, over a flat dense stage) alone: p50/p99 of its part
    of a 1-document and a 100-document upsert and of a delete. The dense stage and the store take each
    write first, untimed (the generator does that before ``_timed`` starts the clock)."""
    import numpy as np

    from streamrank.context import PipelineContext
    from streamrank.index.dense import DenseRetriever
    from streamrank.index.ppr import PPRStage

    context = PipelineContext(work, corpus="bench")
    dense = DenseRetriever.from_dict({"kind": "dense"}, context)
    graph = PPRStage.from_dict({"kind": "ppr", "neighbors": 10}, context)
    graph.bind("vectors_from", dense)
    out: dict[str, Any] = {}
    try:
        with dense.supply_embeddings(vectors.docs):
            started = time.perf_counter()
            context.store.upsert(corpus.documents())
            dense.build(context.store)
            out["dense_build_s"] = round(time.perf_counter() - started, 1)
            started = time.perf_counter()
            graph.build(context.store)
            graph.indexed_ids()
            out["graph_build_s"] = round(time.perf_counter() - started, 1)
            counter = cycle(range(fresh.n))

            def upserts(size: int, count: int) -> Iterator[Callable[[], None]]:
                for _ in range(count):
                    docs = [fresh.document(next(counter), "n") for _ in range(size)]
                    context.store.upsert(docs)
                    dense.add(docs)
                    yield partial(graph.add, docs)

            def deletes(count: int) -> Iterator[Callable[[], None]]:
                for i in islice(np.random.default_rng(SEED).permutation(corpus.n), count):
                    doc_id = f"d{int(i):07d}"
                    context.store.delete([doc_id])
                    dense.delete([doc_id])
                    yield partial(graph.delete, [doc_id])

            next(iter(upserts(1, 1)))()  # warm up
            out["upsert_1"] = _timed(upserts(1, 100), budget_s)
            out["upsert_100"] = _timed(upserts(100, 30), budget_s)
            out["delete_1"] = _timed(deletes(100), budget_s)
            if hasattr(graph, "refresh"):
                out["staleness_before_refresh"] = graph.staleness()
                started = time.perf_counter()
                graph.refresh()
                out["refresh_s"] = round(time.perf_counter() - started, 2)
    finally:
        graph.close()
        dense.close()
        context.close()
    return out


def _encode_all(corpus: SyntheticCorpus, fresh: SyntheticCorpus, queries: list[str], real: bool) -> tuple[Vectors, Any, Any, str]:
    """Vectors of the corpus, the documents written later and the queries; the encoder's name."""
    import numpy as np

    vectors = Vectors()
    if real:
        from streamrank.models import cache_home

        cache = cache_home() / "bench-writes" / f"minilm-{corpus.n}-{fresh.n}-{len(queries)}.npz"
        if not cache.exists():  # encoding 10k documents takes a quarter of an hour on a loaded CPU: once
            from streamrank.compose import load_pipeline

            with tempfile.TemporaryDirectory() as scratch:
                pipeline = load_pipeline("dense", index_dir=scratch, corpus="")
                try:
                    stage = _dense_stage(pipeline)
                    cache.parent.mkdir(parents=True, exist_ok=True)
                    np.savez(
                        cache.with_suffix(".tmp.npz"),
                        matrix=stage.encode_documents(list(corpus.documents())),
                        new=stage.encode_documents(list(fresh.documents("n"))),
                        queries=stage.encode_queries(queries),
                    )
                    cache.with_suffix(".tmp.npz").replace(cache)
                finally:
                    pipeline.close()
        saved = np.load(cache)
        matrix, new, qvecs = saved["matrix"], saved["new"], saved["queries"]
        name = "all-MiniLM-L6-v2 (the real encoder; vectors cached under $STREAMRANK_HOME/bench-writes)"
    else:
        encoder = StandInEncoder(corpus.words)
        matrix = encoder.encode_tokens(corpus.tokens, corpus.offsets)
        new = encoder.encode_tokens(fresh.tokens, fresh.offsets)
        qvecs = encoder.encode(queries)
        name = StandInEncoder.name
    vectors.docs.update({f"d{i:07d}": matrix[i] for i in range(corpus.n)})
    vectors.docs.update({f"n{i:07d}": new[i] for i in range(fresh.n)})
    vectors.queries.update({q: np.asarray(v) for q, v in zip(queries, qvecs, strict=True)})
    return vectors, matrix, new, name


def run_writes_benchmark(
    output_dir: Path | None, quick: bool = False, pipelines: list[str] | None = None, sizes: list[int] | None = None,
    peers: list[str] | None = None, model: str = "minilm",
) -> dict[str, Any]:
    """Write latency, search under writes and compaction per corpus size, pipeline and peer.

    ``model``: ``minilm`` (the real encoder up to 10k documents) or ``stand-in`` (the stand-in
    encoder at every size: writes and searches are timed with precomputed vectors either way)."""
    chosen = [int(s) for s in sizes] if sizes else list(QUICK_SIZES if quick else SIZES)
    names = pipelines or ["dense", "hybrid"]
    peer_names = (list(PEERS) if not quick else []) if peers is None else peers
    budget_s = 5.0 if quick else 30.0
    root = Path(output_dir or tempfile.mkdtemp(prefix="bench-writes-")) / "work"
    results: dict[str, Any] = {"sizes": {}, "durability": PEER_DURABILITY}
    for size in chosen:
        corpus = SyntheticCorpus(size)
        fresh = SyntheticCorpus(3_000, seed=SEED + 1)
        queries = [" ".join(corpus.text(i).split()[:6]) for i in range(0, size, max(1, size // 50))][:50]
        real = size <= REAL_ENCODER_UP_TO and not quick and model != "stand-in"
        started = time.perf_counter()
        vectors, matrix, new, encoder_name = _encode_all(corpus, fresh, queries, real)
        entry: dict[str, Any] = {"encoder": encoder_name, "encode_s": round(time.perf_counter() - started, 1)}
        log.warning("writes bench: %d documents encoded with %s", size, encoder_name)
        for name in names:
            work = root / f"{name}-{size}"
            shutil.rmtree(work, ignore_errors=True)
            if name == "graph":
                entry[name] = _measure_graph(work, corpus, vectors, fresh, budget_s)
            else:
                entry[name] = _measure_pipeline(
                    name, work, corpus, vectors, fresh, queries, budget_s, deletes=size <= 100_000
                )
            shutil.rmtree(work, ignore_errors=True)
            log.warning("writes bench: %s at %d done: %s", name, size, entry[name])
            _checkpoint(output_dir, results, size, entry)
        ids = [f"d{i:07d}" for i in range(size)]
        qmatrix = _stack(vectors, queries)
        for peer in peer_names:
            work = root / f"{peer}-{size}"
            shutil.rmtree(work, ignore_errors=True)
            try:
                entry[peer] = PEERS[peer](work, ids, matrix, new, qmatrix, budget_s)
            except ImportError as exc:
                entry[peer] = {"skipped": f"not installed ({exc}); pip install 'streamrank[bench]'"}
            shutil.rmtree(work, ignore_errors=True)
            log.warning("writes bench: %s at %d done: %s", peer, size, entry[peer])
            _checkpoint(output_dir, results, size, entry)
        del vectors, matrix, new
        gc.collect()
    results["ratios"] = _ratios(results["sizes"], names)
    return results


def _stack(vectors: Vectors, queries: list[str]) -> Any:
    import numpy as np

    return np.stack([vectors.queries[q] for q in queries])


def _checkpoint(output_dir: Path | None, results: dict[str, Any], size: int, entry: dict[str, Any]) -> None:
    import json

    results["sizes"][str(size)] = entry
    if output_dir is not None:
        (Path(output_dir) / "writes.partial.json").write_text(json.dumps(results, indent=2, default=str) + "\n")


def _ratios(by_size: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """Largest size over smallest for every write p50, and search ratios within a size."""
    sizes = sorted(by_size, key=int)
    out: dict[str, Any] = {}
    small, large = by_size[sizes[0]], by_size[sizes[-1]]
    for name in names:
        for op in ("upsert_1", "upsert_100", "delete_1") if len(sizes) > 1 else ():
            try:
                out[f"{name} {op} p50 {sizes[-1]}/{sizes[0]}"] = round(
                    large[name][op]["p50_ms"] / small[name][op]["p50_ms"], 2
                )
            except (KeyError, ZeroDivisionError):
                pass
        for size in sizes:
            got = by_size[size].get(name, {})
            for key, base in (("search_during_burst", "search_idle_paired"),
                              ("search_after_30pct_deleted", "search_fresh_paired"),
                              ("search_after_30pct_deleted", "search_idle")):
                if key in got and got.get(base, {}).get("p50_ms"):
                    out[f"{name} {key} / {base} p50 at {size}"] = round(got[key]["p50_ms"] / got[base]["p50_ms"], 2)
    return out

