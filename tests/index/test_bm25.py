"""BM25 (pyserini/Lucene) on the first 300 SciFact docs, and the last-stage search depth."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from index_support import N_DOCS, PROBES, bm25, context_for, dense, search

from streamrank.context import PipelineContext
from streamrank.errors import IndexMismatchError
from streamrank.pipeline import Pipeline
from streamrank.types import Candidate, Document, Query, Ranking


# ---- BM25 ----------------------------------------------------------------------------------------
def test_bm25_title_query_finds_its_document(ctx: PipelineContext, docs: list[Document]) -> None:
    stage = bm25(ctx, k=10)
    results = search(stage, *(docs[i].title for i in PROBES))
    assert [r.candidates[0].doc_id for r in results] == [docs[i].id for i in PROBES]
    top = results[0].candidates
    assert len(top) == 10 and all(a.score >= b.score for a, b in zip(top, top[1:], strict=False))
    assert top[0].stage_scores == {"bm25": top[0].score}


def test_bm25_single_and_batch_search_agree(ctx: PipelineContext, docs: list[Document]) -> None:
    stage = bm25(ctx, k=20)
    texts = [docs[3].text[:200], docs[40].title]
    batch = search(stage, *texts)
    single = [search(stage, t)[0] for t in texts]
    for b, s in zip(batch, single, strict=True):
        assert [(c.doc_id, c.score) for c in b.candidates] == [(c.doc_id, c.score) for c in s.candidates]


@pytest.mark.parametrize("make", [bm25, dense], ids=["bm25", "dense"])
def test_last_stage_searches_only_as_deep_as_the_answer(
    ctx: PipelineContext, docs: list[Document], make: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A request for the top 5 searches 5 deep, and gets the same 5 a 100-deep search ranks first."""
    stage = make(ctx, k=100)
    texts = [docs[3].text[:200], docs[40].title]
    deep = search(stage, *texts)
    depths: list[int] = []
    original = type(stage)._search
    monkeypatch.setattr(type(stage), "_search", lambda s, r, p, k: depths.append(k) or original(s, r, p, k))
    pipe = Pipeline("t", [stage], ctx)
    top = pipe.run([Ranking(query=Query(f"q{i}", t)) for i, t in enumerate(texts)], k=5)
    assert depths == [5]
    for shallow, full in zip(top, deep, strict=True):
        assert [(c.doc_id, c.score) for c in shallow.candidates] == [
            (c.doc_id, c.score) for c in full.candidates[:5]
        ]
    pipe.run([Ranking(query=Query("q", texts[0]))], k=500)  # never deeper than the stage's own k
    assert depths == [5, 100]


def test_bm25_params_are_search_time(ctx: PipelineContext, docs: list[Document]) -> None:
    """Another k1/b searches the same index (no mismatch) and changes the scores."""
    default = search(bm25(ctx), docs[7].title)[0].candidates[0]
    tuned = search(bm25(ctx, k1=1.5, b=0.9), docs[7].title)[0].candidates[0]
    assert default.doc_id == tuned.doc_id and default.score != pytest.approx(tuned.score)


def test_bm25_stores_what_it_is_asked_to_and_more_is_compatible(
    tmp_path: Path, docs: list[Document], minilm: Any
) -> None:
    """By default Lucene keeps no raw JSON (the store has the text); an index keeping it still serves."""
    from pyserini.index.lucene import LuceneIndexReader

    ctx = context_for(tmp_path / "idx", minilm)
    ctx.store.upsert(docs[:40])
    lean = bm25(ctx)
    lean.build(ctx.store)
    reader = LuceneIndexReader(str(lean.folder))
    assert reader.doc_raw(docs[0].id) is None
    with pytest.raises(IndexMismatchError, match="store"):
        search(bm25(ctx, store=["positions", "raw"]), docs[0].title)
    lean.close()

    full = bm25(ctx, store=["raw", "positions", "docvectors"])
    full.build(ctx.store, rebuild=True)
    assert json.loads(LuceneIndexReader(str(full.folder)).doc_raw(docs[0].id))["id"] == docs[0].id
    ranked = search(bm25(ctx), docs[0].title)[0]  # the lean default over the fuller index
    assert ranked.candidates[0].doc_id == docs[0].id
    full.close()
    ctx.close()


def test_bm25_supplied_pool_gets_exact_index_scores(ctx: PipelineContext, docs: list[Document]) -> None:
    stage = bm25(ctx, k=N_DOCS)
    query = docs[12].title
    full = {c.doc_id: c.score for c in search(stage, query)[0].candidates}
    pool = [Candidate(doc_id=d.id, score=0.0) for d in docs[5:30]]
    ranked = stage.run([Ranking(query=Query("q", query), candidates=pool)])[0]
    assert sorted(ranked.doc_ids()) == sorted(c.doc_id for c in pool)  # exactly the pool, nothing added
    for cand in ranked.candidates:
        assert cand.score == pytest.approx(full.get(cand.doc_id, 0.0), abs=1e-4)
    assert ranked.candidates[0].doc_id == docs[12].id


def test_bm25_pool_outside_index_keeps_incoming_scores(ctx: PipelineContext) -> None:
    pool = [
        Candidate(doc_id="ext-1", score=3.0, document=Document("ext-1", "axolotl regeneration")),
        Candidate(doc_id="ext-2", score=7.0, document=Document("ext-2", "unrelated text")),
    ]
    ranked = bm25(ctx).run([Ranking(query=Query("q", "axolotl"), candidates=pool)])[0]
    assert [(c.doc_id, c.score) for c in ranked.candidates] == [("ext-2", 7.0), ("ext-1", 3.0)]
    assert any("incoming scores" in n for n in ranked.notes)


def test_empty_document_is_indexed_by_id_only(copy_dir: Path, minilm: Any) -> None:
    """Anserini refuses empty documents; the stage indexes their id so index and store stay in step."""
    ctx = context_for(copy_dir, minilm)
    stage = bm25(ctx)
    empty = Document("empty-doc", "", "")
    ctx.store.upsert([empty])
    stage.add([empty])
    assert "empty-doc" in stage.indexed_ids()
    assert stage.manifest()["doc_count"] == N_DOCS + 1
    assert "empty-doc" not in search(stage, "cell")[0].doc_ids()
    ctx.close()


def test_ensure_jvm_is_idempotent() -> None:
    from streamrank.index.jvm import ensure_jvm

    ensure_jvm()
    ensure_jvm()
    from jnius import autoclass

    assert autoclass("org.apache.lucene.util.Version").LATEST.major >= 9
