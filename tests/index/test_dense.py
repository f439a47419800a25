"""Dense retrieval (MiniLM + FAISS) on the first 300 SciFact docs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from index_support import PROBES, EncodeCounter, context_for, dense, search, write_pipeline

from streamrank.compose import load_pipeline
from streamrank.context import PipelineContext
from streamrank.errors import ConfigError, IndexMissingError
from streamrank.models import MINILM
from streamrank.types import Candidate, Document, Query, Ranking


# ---- dense ---------------------------------------------------------------------------------------
def test_dense_title_query_finds_its_document(ctx: PipelineContext, docs: list[Document]) -> None:
    stage = dense(ctx, k=10)
    results = search(stage, *(docs[i].title for i in PROBES))
    assert [r.candidates[0].doc_id for r in results] == [docs[i].id for i in PROBES]
    assert results[0].candidates[0].stage_scores["dense"] == pytest.approx(results[0].candidates[0].score)
    assert results[0].calls and results[0].calls[0].model == MINILM


def test_dense_scores_are_cosines_of_stored_embeddings(ctx: PipelineContext, docs: list[Document]) -> None:
    stage = dense(ctx, k=5)
    ranking = search(stage, docs[21].title)[0]
    q = stage.encode_queries([docs[21].title])[0]
    stored = stage.embeddings_for(ranking.doc_ids())
    assert np.allclose(stored @ q, [c.score for c in ranking.candidates], atol=1e-5)
    assert np.allclose(np.linalg.norm(stored, axis=1), 1.0, atol=1e-4)
    fresh = stage.encode_documents([docs[21]])[0]
    assert np.allclose(stage.embeddings_for([docs[21].id])[0], fresh, atol=1e-4)


def test_other_index_types_agree_with_flat_and_reuse_embeddings(
    copy_dir: Path, minilm: Any, docs: list[Document], monkeypatch: pytest.MonkeyPatch
) -> None:
    ctx = context_for(copy_dir, minilm)
    counter = EncodeCounter(monkeypatch)
    queries = [docs[i].title for i in PROBES]
    flat = [r.candidates[0].doc_id for r in search(dense(ctx, k=5), *queries)]
    for index_type in ("hnsw", "ivfpq"):
        stage = dense(ctx, k=5, index_type=index_type, index=f"dense-{index_type}")
        stage.build(ctx.store)
        info = stage.manifest()["info"]
        assert info["built_as"] == index_type and info["embeddings_from"] == "dense"
        assert [r.candidates[0].doc_id for r in search(stage, *queries)] == flat
    assert counter.docs == 0  # both built from the flat index's stored embeddings


def test_ivfpq_falls_back_to_flat_on_a_tiny_corpus(ctx: PipelineContext) -> None:
    stage = dense(ctx, index_type="ivfpq")
    vectors = np.random.default_rng(0).standard_normal((40, 384)).astype(np.float32)
    index, info = stage._new_index(vectors)
    assert info["built_as"] == "flat" and "too few" in info["fallback"]
    assert index.ntotal == 40


def test_dense_supplied_pool_scores_exactly_the_pool(ctx: PipelineContext, docs: list[Document]) -> None:
    stage = dense(ctx, k=100)
    query = docs[8].title
    pool = [Candidate(doc_id=d.id, score=0.0) for d in docs[:10]]  # no text: stored vectors
    pool.append(Candidate(doc_id="0", score=0.0, document=Document("0", docs[8].contents)))  # outside text
    pool.append(Candidate(doc_id="ext", score=0.0, document=Document("ext", "Cats sleep a lot.")))
    ranked = stage.run([Ranking(query=Query("q", query), candidates=pool)])[0]
    assert sorted(ranked.doc_ids()) == sorted(c.doc_id for c in pool)
    q = stage.encode_queries([query])[0]
    expected = {
        d.id: float(v @ q)
        for d, v in zip(docs[:10], stage.embeddings_for([d.id for d in docs[:10]]), strict=True)
    }
    expected["0"] = expected[docs[8].id]
    expected["ext"] = float(stage.encode_documents([Document("ext", "Cats sleep a lot.")])[0] @ q)
    for cand in ranked.candidates:
        assert cand.score == pytest.approx(expected[cand.doc_id], abs=1e-4)
    assert set(ranked.doc_ids()[:2]) == {docs[8].id, "0"}  # the same text, from the index and as supplied


def test_dense_pool_works_without_any_index(minilm: Any) -> None:
    ctx = PipelineContext(None, device="cpu")
    ctx.shared(("sentence-encoder", MINILM), lambda: minilm)
    stage = dense(ctx)
    pool = [
        Candidate(str(i), 0.0, document=Document(str(i), t)) for i, t in enumerate(["cats purr", "dogs bark"])
    ]
    ranked = stage.run([Ranking(query=Query("q", "why do dogs bark"), candidates=pool)])[0]
    assert ranked.doc_ids() == ["1", "0"]
    with pytest.raises(IndexMissingError):
        search(stage, "dogs")


def test_lowrank_encoder_streaming_path_equals_unfused(tmp_path: Path, docs: list[Document]) -> None:
    """`lowrank = {...}` compresses the dense encoder; the streaming kernels give the unfused scores."""
    pool = docs[:8]
    scores = {}
    for backend in ("unfused", "torch"):
        body = f'[[stages]]\nkind = "dense"\nlowrank = {{ratio = 0.5, backend = "{backend}"}}\n'
        pipeline = load_pipeline(write_pipeline(tmp_path, body))
        ranking = pipeline.rerank(pool[3].title, pool)
        scores[backend] = {c.doc_id: c.score for c in ranking.candidates}
        assert pipeline.stages[0].settings()["lowrank"]["backend"] == backend  # part of the manifest
    assert scores["torch"].keys() == scores["unfused"].keys()
    assert max(abs(scores["torch"][d] - scores["unfused"][d]) for d in scores["torch"]) <= 1e-4
    with pytest.raises(ConfigError, match="unknown lowrank setting 'bakend'"):
        load_pipeline(write_pipeline(tmp_path, '[[stages]]\nkind = "dense"\nlowrank = {bakend = "torch"}\n'))


def test_history_weight_moves_the_query_towards_the_history(ctx: PipelineContext, docs: list[Document]) -> None:
    """A user history pulls dense results towards it; without history nothing changes."""
    plain, personal = dense(ctx), dense(ctx, history_weight=0.8)
    query = "cell biology"
    target = docs[10]
    without = personal.run([Ranking(query=Query("q", query))])[0]
    assert without.doc_ids() == plain.run([Ranking(query=Query("q", query))])[0].doc_ids()
    with_history = personal.run([Ranking(query=Query("q", query, user_history=(target.id, "no-such-doc")))])[0]
    assert with_history.doc_ids().index(target.id) < without.doc_ids().index(target.id)


def test_bucketed_encoding_keeps_order_and_values(minilm: Any, docs: list[Document]) -> None:
    """Length-bucketed batches give each text the embedding a plain encode gives it, in input order."""
    from streamrank.models import encode_sentences

    texts = [docs[0].title, docs[1].text[:600], "x", docs[2].text[:150], docs[3].title]
    got = encode_sentences(minilm, texts, batch_size=2)
    want = minilm.encode(texts, normalize_embeddings=True, convert_to_numpy=True)
    assert got.shape == want.shape and np.abs(got - want).max() < 1e-5


def test_query_dtype_encodes_queries_only_and_needs_no_rebuild(
    ctx: PipelineContext, docs: list[Document], monkeypatch: pytest.MonkeyPatch
) -> None:
    plain, fast = dense(ctx, k=10), dense(ctx, k=10, query_dtype="bfloat16")
    assert fast.settings() == plain.settings()  # search-time: the float32 index serves it
    titles = [docs[i].title for i in PROBES]
    q32, q16 = plain.encode_queries(titles), fast.encode_queries(titles)
    assert not np.array_equal(q32, q16)
    assert np.min(np.sum(q32 * q16, axis=1)) > 0.99
    assert fast.encode_documents(docs[:2]).tobytes() == plain.encode_documents(docs[:2]).tobytes()
    assert [r.candidates[0].doc_id for r in search(fast, *titles)] == [docs[i].id for i in PROBES]
    import streamrank.models as models

    monkeypatch.setattr(models, "bfloat16_is_native", lambda device=None: False)
    auto = dense(ctx, k=10, query_dtype="auto")
    assert auto.query_encoding.dtype == "float32"  # no native bfloat16: the index's dtype
    monkeypatch.setattr(models, "bfloat16_is_native", lambda device=None: True)
    assert auto.query_encoding.dtype == "bfloat16"
