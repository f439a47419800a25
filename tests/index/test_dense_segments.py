"""The dense index's append-only segments, tombstones filtered inside FAISS and background compaction
(issue 24), on small random-vector corpora (vectors supplied, so nothing is encoded)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from index_support import context_for, dense

from streamrank.index import dense_segments as seg
from streamrank.index.dense import DenseRetriever
from streamrank.types import Document, Query, Ranking

DIM = 384
N = 400


def vector(doc_id: str) -> np.ndarray:
    """A fixed random unit vector per id."""
    rng = np.random.default_rng(abs(hash(doc_id)) % 2**32)
    v = rng.standard_normal(DIM).astype(np.float32)
    return v / np.linalg.norm(v)


class Corpus:
    """Documents, their vectors and a dense stage over them (built in ``folder``)."""

    def __init__(self, folder: Path, minilm: Any, n: int = N, **options: Any) -> None:
        self.ctx = context_for(folder, minilm)
        self.stage = dense(self.ctx, k=10, **options)
        self.vectors = {f"d{i}": vector(f"d{i}") for i in range(n)}
        docs = [Document(id=i, text=f"text of {i}") for i in self.vectors]
        self.ctx.store.upsert(docs)
        with self.stage.supply_embeddings(self.vectors):
            self.stage.build(self.ctx.store)

    def add(self, ids: list[str]) -> None:
        docs = [Document(id=i, text=f"text of {i}") for i in ids]
        self.vectors.update({i: vector(i) for i in ids})
        self.ctx.store.upsert(docs)
        with self.stage.supply_embeddings(self.vectors):
            self.stage.add(docs)

    def delete(self, ids: list[str]) -> None:
        self.ctx.store.delete(ids)
        self.stage.delete(ids)
        for i in ids:
            self.vectors.pop(i, None)

    def exact(self, query: np.ndarray, k: int = 10) -> list[str]:
        ids = list(self.vectors)
        scores = np.stack([self.vectors[i] for i in ids]) @ query
        return [ids[j] for j in np.argsort(-scores, kind="stable")[:k]]


def run(stage: DenseRetriever, queries: np.ndarray, k: int = 10, scores: bool = False) -> list[list[Any]]:
    """The stage's top ``k`` ids (with ``scores``: (id, score) pairs) for query vectors."""
    rankings = [Ranking(query=Query(id=f"q{i}", text=f"q{i}")) for i in range(len(queries))]
    with stage.lock:
        stage._ensure_open()
        hits = stage._search(rankings, queries.astype(np.float32), k)
    return hits if scores else [[doc_id for doc_id, _ in found] for found in hits]


@pytest.fixture
def queries() -> np.ndarray:
    return np.stack([vector(f"query-{i}") for i in range(8)])


@pytest.fixture
def corpus(tmp_path: Path, minilm: Any) -> Iterator[Corpus]:
    made = Corpus(tmp_path / "index", minilm, auto_compact=False)
    yield made
    made.stage.close()


def base_files(folder: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in folder.glob("*") if p.suffix in {".npy", ".faiss"}}


def test_writes_append_to_the_log_and_rewrite_nothing(corpus: Corpus, minilm: Any, queries: np.ndarray) -> None:
    folder = corpus.stage.folder
    before = base_files(folder)
    corpus.add(["new-a", "new-b"])
    corpus.add(["d3"])  # a replacement: the old row becomes a tombstone
    corpus.delete(["d5", "d6", "absent"])
    assert base_files(folder) == before  # nothing rewritten
    info = corpus.stage.manifest()["info"]
    assert info["segments"] == 3 and info["masked_rows"] == 3 and info["doc_count"] == N + 2 - 2
    assert (folder / "segments.log").stat().st_size == info["log_bytes"] > 0

    top = run(corpus.stage, np.stack([vector("new-a"), vector("d3")]), 1)
    assert top == [["new-a"], ["d3"]]
    reopened = dense(context_for(folder.parent, minilm), k=10)  # replays the log
    assert sorted(reopened.indexed_ids()) == sorted(corpus.vectors)
    assert run(reopened, queries) == run(corpus.stage, queries) == [corpus.exact(q) for q in queries]


@pytest.mark.parametrize("options", [{}, {"index_type": "hnsw"}, {"index_type": "ivfpq", "pq_m": 8, "pq_bits": 4, "nprobe": 64}])
def test_tombstones_are_filtered_inside_faiss(tmp_path: Path, minilm: Any, queries: np.ndarray, options: dict) -> None:
    corpus = Corpus(tmp_path / "index", minilm, auto_compact=False, **options)
    assert corpus.stage.manifest()["info"]["built_as"] == options.get("index_type", "flat")
    deleted = [f"d{i}" for i in range(0, N, 3)]  # a third of the corpus
    corpus.delete(deleted)
    corpus.add([f"late-{i}" for i in range(20)])
    found = run(corpus.stage, queries)
    assert all(len(hits) == 10 for hits in found)  # k results though FAISS was asked for k only
    assert not set(deleted) & {d for hits in found for d in hits}
    if not options:  # flat is exact: exactly the brute-force top 10 of the live vectors
        assert found == [corpus.exact(q) for q in queries]
    elif options["index_type"] == "hnsw":
        recall = np.mean([len(set(h) & set(corpus.exact(q))) / 10 for h, q in zip(found, queries, strict=True)])
        assert recall >= 0.9
    else:  # IVF-PQ visiting every cell: its own unfiltered ranking with the tombstones taken out
        import faiss

        state = corpus.stage._state
        scores, rows = state.index.search(queries, state.rows, params=faiss.SearchParametersIVF(nprobe=64))
        want = [[s for s, r in zip(ss, rr, strict=True) if r >= 0 and state.ids[r] is not None][:10]
                for ss, rr in zip(scores, rows, strict=True)]
        got = [[s for _, s in hits] for hits in run(corpus.stage, queries, scores=True)]
        np.testing.assert_allclose(got, want, rtol=1e-5)  # (PQ codes tie: compare scores, not ids)
    corpus.stage.close()


def test_compaction_gives_the_same_results_and_takes_writes_made_meanwhile(
    corpus: Corpus, minilm: Any, queries: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    stage, folder = corpus.stage, corpus.stage.folder
    corpus.delete([f"d{i}" for i in range(0, N, 4)])
    corpus.add(["kept-1"])
    before = run(stage, queries)
    old_generation = stage.manifest()["info"]["generation"]
    during: list[list[list[str]]] = []
    original = seg.write_generation

    def slow_write(*args: Any) -> None:
        """The new generation is written without a lock: searches and writes go on meanwhile."""
        original(*args)
        during.append(run(stage, queries))
        corpus.add(["during-1", "d1"])  # a new document and a replacement
        corpus.delete(["d2", "kept-1"])
        during.append(run(stage, queries))

    monkeypatch.setattr(seg, "write_generation", slow_write)
    thread = threading.Thread(target=stage.compact)
    thread.start()
    thread.join()
    monkeypatch.undo()
    assert during[0] == before
    info = stage.manifest()["info"]
    assert info["generation"] != old_generation and info["masked_rows"] == 3  # d1 replaced, d2 and kept-1 deleted
    assert info["segments"] == 2 and info["base_rows"] == N - N // 4 + 1
    assert run(stage, queries) == during[1] == [corpus.exact(q) for q in queries]
    names = {p.name for p in folder.iterdir()}
    assert "embeddings.npy" not in names and "segments.log" not in names  # the old generation is gone
    reopened = dense(context_for(folder.parent, minilm), k=10)
    assert sorted(reopened.indexed_ids()) == sorted(corpus.vectors)
    assert run(reopened, queries) == run(stage, queries)


def test_compaction_starts_in_the_background_on_its_triggers(tmp_path: Path, minilm: Any, queries: np.ndarray) -> None:
    corpus = Corpus(tmp_path / "index", minilm, n=200, compact_tombstones=0.2, compact_segments=1000)
    corpus.delete([f"d{i}" for i in range(30)])  # 15%: no compaction yet
    assert corpus.stage.manifest()["info"]["generation"] == ""
    corpus.delete([f"d{i}" for i in range(30, 50)])  # 25%
    thread = corpus.stage._compactor
    assert thread is not None
    thread.join()
    info = corpus.stage.manifest()["info"]
    assert info["generation"] != "" and info["masked_rows"] == 0 and info["doc_count"] == 150
    assert run(corpus.stage, queries) == [corpus.exact(q) for q in queries]
    by_segments = Corpus(tmp_path / "other", minilm, n=50, compact_segments=3)
    for i in range(3):
        by_segments.add([f"s{i}"])
    by_segments.stage.close()  # waits for the compaction it started
    assert mf_generation(tmp_path / "other" / "dense") != ""
    corpus.stage.close()


def mf_generation(folder: Path) -> str:
    from streamrank.index import manifest as mf

    return (mf.read_manifest(folder) or {})["info"]["generation"]


def test_a_torn_record_is_ignored_and_cut_off(corpus: Corpus, minilm: Any) -> None:
    corpus.add(["whole"])
    log = corpus.stage.folder / "segments.log"
    good = log.stat().st_size
    record = seg.encode_record(seg.ADD, ["torn"], vector("torn")[None, :])
    with open(log, "ab") as handle:  # what a crash in mid-append leaves
        handle.write(record[: len(record) // 2])
    records, end = seg.read_log(log)
    assert [r.ids for r in records] == [["whole"]] and end == good
    reopened = dense(context_for(corpus.stage.folder.parent, minilm), k=10)
    assert "torn" not in reopened.indexed_ids() and "whole" in reopened.indexed_ids()
    corpus.add(["after"])  # the next append cuts the torn tail off
    assert [r.ids for r in seg.read_log(log)[0]] == [["whole"], ["after"]]
