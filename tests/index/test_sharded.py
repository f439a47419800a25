"""Sharded indexes (``shards = N``), in process: stable placement, scatter-gather equal to one index,
writes routed to the owning shard, recovery per shard. On the first 300 SciFact docs."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from index_support import HYBRID, N_DOCS, NEW_DOC, PROBES, EncodeCounter, write_pipeline

from streamrank.compose import load_pipeline
from streamrank.errors import ConfigError
from streamrank.index.sharded import merge_top_k, shard_of, split_by_shard
from streamrank.index.sharded_stage import ShardedRetriever
from streamrank.models import MINILM
from streamrank.pipeline import Pipeline
from streamrank.types import Document

DENSE = """
[[stages]]
kind = "dense"
k = 100
"""


def pipeline(tmp_path: Path, index_dir: Path, minilm: Any, body: str, shards: int = 1) -> Pipeline:
    folder = tmp_path / f"p{shards}-{abs(hash(body))}"
    folder.mkdir(exist_ok=True)
    p = load_pipeline(write_pipeline(folder, f"shards = {shards}\n" + body), index_dir=index_dir)
    p.context.shared(("sentence-encoder", MINILM), lambda: minilm)
    return p


# ---- placement and merge -------------------------------------------------------------------------
def test_shard_of_is_stable_and_spreads_ids() -> None:
    # fixed values: the hash is BLAKE2b of the UTF-8 id, never Python's per-process salted hash()
    ids = ("4983", "5836", "7912", "doc/with/slashes")
    assert [shard_of(i, 4) for i in ids] == [3, 2, 1, 2]
    assert [shard_of(i, 7) for i in ids] == [0, 3, 1, 1]
    assert shard_of("x", 1) == 0
    assert shard_of("\ud800lone", 3) in range(3)  # a lone surrogate still has a shard
    counts = Counter(shard_of(str(i), 4) for i in range(4000))
    assert set(counts) == {0, 1, 2, 3} and min(counts.values()) > 900
    groups = split_by_shard([str(i) for i in range(20)], 4, key=lambda i: i)
    assert sorted(i for g in groups.values() for i in g) == sorted(str(i) for i in range(20))
    assert all(shard_of(i, 4) == s for s, g in groups.items() for i in g)
    with pytest.raises(ValueError):
        shard_of("x", 0)


def test_merge_top_k_orders_by_score_then_id() -> None:
    a = [("d3", 0.9), ("d1", 0.5), ("d9", 0.1)]
    b = [("d2", 0.7), ("d0", 0.5)]
    assert merge_top_k([a, b], 4) == [("d3", 0.9), ("d2", 0.7), ("d0", 0.5), ("d1", 0.5)]
    assert merge_top_k([a, [], b], 10)[-1] == ("d9", 0.1)
    assert merge_top_k([], 3) == []


# ---- dense: exactly the single index -------------------------------------------------------------
def test_four_dense_shards_equal_the_single_index_exactly(
    copy_dir: Path, tmp_path: Path, minilm: Any, docs: list[Document], monkeypatch: pytest.MonkeyPatch
) -> None:
    single = pipeline(tmp_path, copy_dir, minilm, DENSE)
    sharded = pipeline(tmp_path, copy_dir, minilm, DENSE, shards=4)
    stage = sharded.stages[0]
    assert isinstance(stage, ShardedRetriever) and stage.name == "dense"
    counter = EncodeCounter(monkeypatch)
    sharded.index()
    assert counter.docs == 0  # the single index's stored vectors were reused, split by shard
    per_shard = [len(w.indexed_ids()) for w in stage.group.workers]  # type: ignore[attr-defined]
    assert sum(per_shard) == N_DOCS and min(per_shard) > 40
    queries = [docs[i].title for i in PROBES]
    for k in (10, 100):
        one_by_one = [(single.search(q, k=k), sharded.search(q, k=k)) for q in queries]
        batched = list(zip(single.search_batch(queries, k=k), sharded.search_batch(queries, k=k), strict=True))
        for a, b in one_by_one + batched:  # 20 queries in a batch take FAISS's BLAS path
            assert [(c.doc_id, c.score) for c in a.candidates] == [(c.doc_id, c.score) for c in b.candidates]
            assert [c.stage_scores for c in a.candidates] == [c.stage_scores for c in b.candidates]
    single.close()
    sharded.close()


def test_writes_go_to_the_owning_shard(copy_dir: Path, tmp_path: Path, minilm: Any) -> None:
    single = pipeline(tmp_path, copy_dir, minilm, DENSE)
    sharded = pipeline(tmp_path, copy_dir, minilm, DENSE, shards=4)
    sharded.index()
    stage = sharded.stages[0]
    workers = stage.group.workers  # type: ignore[attr-defined]
    owner = shard_of(NEW_DOC.id, 4)
    before = [set(w.indexed_ids()) for w in workers]

    sharded.add_documents([NEW_DOC], group=[single])  # the service's path: the store once, every index
    after = [set(w.indexed_ids()) for w in workers]
    assert after[owner] == before[owner] | {NEW_DOC.id}
    assert all(after[s] == before[s] for s in range(4) if s != owner)
    query = "axolotl limb regeneration in microgravity"
    a, b = single.search(query, k=5), sharded.search(query, k=5)
    assert b.candidates[0].doc_id == NEW_DOC.id
    assert [(c.doc_id, c.score) for c in a.candidates] == [(c.doc_id, c.score) for c in b.candidates]

    sharded.delete_documents([NEW_DOC.id], group=[single])
    assert [set(w.indexed_ids()) for w in workers] == before
    assert NEW_DOC.id not in sharded.search(query, k=5).doc_ids()

    # a shard that lost a write (a crash between the store and the index) is repaired from the store
    sharded.context.store.upsert([NEW_DOC])
    assert sharded.recover() == {"dense": 1}
    assert set(workers[owner].indexed_ids()) == before[owner] | {NEW_DOC.id}
    assert workers[owner].recover() == 0
    single.close()
    sharded.close()


def test_sharded_pool_scoring_matches_the_single_index(copy_dir: Path, tmp_path: Path, minilm: Any, docs: list[Document]) -> None:
    single = pipeline(tmp_path, copy_dir, minilm, DENSE)
    sharded = pipeline(tmp_path, copy_dir, minilm, DENSE, shards=4)
    sharded.index()
    pool = [Document(id=d.id, text=d.text, title=d.title) for d in docs[:12]]
    a = single.rerank(docs[3].title, pool, k=12)
    b = sharded.rerank(docs[3].title, pool, k=12)
    assert a.doc_ids() == b.doc_ids() and a.doc_ids()[0] == docs[3].id
    assert [c.score for c in a.candidates] == pytest.approx([c.score for c in b.candidates], abs=1e-5)
    single.close()
    sharded.close()


# ---- BM25 and hybrid ------------------------------------------------------------------------------
def test_sharded_hybrid_builds_bm25_and_dense_shards(
    copy_dir: Path, tmp_path: Path, minilm: Any, docs: list[Document]
) -> None:
    single = pipeline(tmp_path, copy_dir, minilm, HYBRID)
    sharded = pipeline(tmp_path, copy_dir, minilm, HYBRID, shards=3)
    bm25_stage, dense_stage = sharded.stages[0].children  # type: ignore[attr-defined]
    assert isinstance(bm25_stage, ShardedRetriever) and isinstance(dense_stage, ShardedRetriever)
    assert [bm25_stage.name, dense_stage.name] == ["bm25", "dense"]
    sharded.index()
    assert (copy_dir / "shards-3" / "0" / "bm25" / "manifest.json").exists()
    assert sorted(bm25_stage.indexed_ids()) == sorted(d.id for d in docs)
    hits = 0
    for i in PROBES:
        a, b = single.search(docs[i].title, k=10), sharded.search(docs[i].title, k=10)
        assert set(a.candidates[0].stage_scores) == set(b.candidates[0].stage_scores) == {"bm25", "dense", "fusion"}
        hits += b.candidates[0].doc_id == docs[i].id
        assert len(set(a.doc_ids()) & set(b.doc_ids())) >= 7  # BM25 uses per-shard statistics
    assert hits >= len(PROBES) - 1
    sharded.index()  # a second build keeps every shard
    single.close()
    sharded.close()


def test_sharding_config_errors(tmp_path: Path, copy_dir: Path, minilm: Any) -> None:
    with pytest.raises(ConfigError, match="keeps no index to shard"):
        pipeline(tmp_path, copy_dir, minilm, '[[stages]]\nkind = "sharded"\nshards = 2\nretriever = {kind = "fusion", retrievers = [{kind = "bm25"}]}\n')
    with pytest.raises(ConfigError, match="history_weight"):
        pipeline(tmp_path, copy_dir, minilm, DENSE + "history_weight = 0.5\n", shards=2)
    with pytest.raises(ConfigError, match="shards"):
        pipeline(tmp_path, copy_dir, minilm, DENSE, shards=0)
