"""BM25 (pyserini/Lucene), dense (MiniLM + FAISS), manifests and fusion on the first 300 SciFact docs.

Real components throughout: one Lucene index and one FAISS index are built per session (MiniLM
loaded once); tests that change an index work on a copy of that folder.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from streamrank import registry
from streamrank.config import load_pipeline
from streamrank.context import PipelineContext
from streamrank.errors import ConfigError, IndexMismatchError, IndexMissingError
from streamrank.index import manifest as mf
from streamrank.index.bm25 import BM25Retriever
from streamrank.index.dense import DenseRetriever
from streamrank.index.fusion import FusionStage, fuse
from streamrank.models import MINILM, load_sentence_encoder
from streamrank.pipeline import Pipeline
from streamrank.stage import BaseStage, StageConfig
from streamrank.types import Candidate, Document, Query, Ranking

torch.set_num_threads(1)

N_DOCS = 300
PROBES = range(0, N_DOCS, 15)  # 20 documents whose titles serve as queries
NEW_DOC = Document(
    id="zz-new",
    title="Axolotl limb regeneration under microgravity",
    text="We report axolotl limb regeneration aboard the orbital station under microgravity.",
)


# ---- fixtures ------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def docs(datasets_root: Path) -> list[Document]:
    out = []
    with open(datasets_root / "beir" / "scifact" / "corpus.jsonl") as handle:
        for line in handle:
            row = json.loads(line)
            out.append(Document(id=row["_id"], title=row["title"], text=row["text"]))
            if len(out) == N_DOCS:
                break
    return out


@pytest.fixture(scope="session")
def minilm() -> Any:
    return load_sentence_encoder(MINILM, "cpu")


def context_for(index_dir: Path, model: Any) -> PipelineContext:
    """A context whose MiniLM is the session's already loaded one."""
    ctx = PipelineContext(index_dir, device="cpu")
    ctx.shared(("sentence-encoder", MINILM), lambda: model)
    return ctx


@pytest.fixture(scope="session")
def built(tmp_path_factory: pytest.TempPathFactory, docs: list[Document], minilm: Any) -> Path:
    """An index_dir with the store, a BM25 index and a flat dense index (built once)."""
    index_dir = tmp_path_factory.mktemp("scifact300")
    ctx = context_for(index_dir, minilm)
    ctx.store.upsert(docs)
    BM25Retriever.from_dict({"kind": "bm25"}, ctx).build(ctx.store)
    DenseRetriever.from_dict({"kind": "dense"}, ctx).build(ctx.store)
    ctx.close()
    return index_dir


@pytest.fixture
def copy_dir(built: Path, tmp_path: Path) -> Path:
    """A private copy of the built index_dir for tests that change it."""
    target = tmp_path / "index"
    shutil.copytree(built, target)
    return target


@pytest.fixture
def ctx(built: Path, minilm: Any):
    context = context_for(built, minilm)
    yield context
    context.close()


class EncodeCounter:
    """Counts the documents DenseRetriever encodes (installed over encode_documents)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.docs = 0
        original = DenseRetriever.encode_documents

        def counting(stage: DenseRetriever, documents: Sequence[Document]) -> np.ndarray:
            self.docs += len(documents)
            return original(stage, documents)

        monkeypatch.setattr(DenseRetriever, "encode_documents", counting)


def bm25(ctx: PipelineContext, **options: Any) -> BM25Retriever:
    return BM25Retriever.from_dict({"kind": "bm25", **options}, ctx)  # type: ignore[return-value]


def dense(ctx: PipelineContext, **options: Any) -> DenseRetriever:
    return DenseRetriever.from_dict({"kind": "dense", **options}, ctx)  # type: ignore[return-value]


def search(stage: BaseStage, *texts: str) -> list[Ranking]:
    return stage.run([Ranking(query=Query(id=f"q{i}", text=t)) for i, t in enumerate(texts)])


def write_pipeline(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "pipeline.toml"
    path.write_text('name = "t"\n' + body)
    return path


HYBRID = """
[[stages]]
kind = "fusion"
k = 50
  [[stages.retrievers]]
  kind = "bm25"
  k = 50
  [[stages.retrievers]]
  kind = "dense"
  k = 50
"""


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


# ---- manifests: reuse, mismatch, missing ---------------------------------------------------------
def test_build_on_matching_index_does_not_reencode(
    ctx: PipelineContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    counter = EncodeCounter(monkeypatch)
    before = mf.read_manifest(ctx.index_dir / "dense")
    dense(ctx).build(ctx.store)
    bm25(ctx).build(ctx.store)
    assert counter.docs == 0
    assert mf.read_manifest(ctx.index_dir / "dense") == before


def test_rebuild_true_reencodes(copy_dir: Path, minilm: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    ctx = context_for(copy_dir, minilm)
    stored = np.load(copy_dir / "dense" / "embeddings.npy")
    calls = []

    def fake_encode(stage: DenseRetriever, documents: Sequence[Document]) -> np.ndarray:
        calls.append(len(documents))
        return stored[: len(documents)]

    monkeypatch.setattr(DenseRetriever, "encode_documents", fake_encode)
    created = mf.read_manifest(copy_dir / "dense")["generation"]
    dense(ctx).build(ctx.store, rebuild=True)
    assert calls == [N_DOCS]
    assert mf.read_manifest(copy_dir / "dense")["generation"] != created
    assert not list(copy_dir.glob("dense.*"))  # no staging or retired folder left behind


def test_manifest_records_settings_corpus_and_versions(ctx: PipelineContext) -> None:
    m = mf.read_manifest(ctx.index_dir / "dense")
    assert m["settings"]["model"] == MINILM and m["settings"]["index_type"] == "flat"
    assert m["info"]["dimension"] == 384 and m["doc_count"] == N_DOCS
    assert m["corpus_checksum"] == ctx.store.checksum()
    assert {"faiss-cpu", "sentence-transformers", "torch"} <= set(m["libraries"])
    b = mf.read_manifest(ctx.index_dir / "bm25")
    assert b["settings"]["stemmer"] == "porter" and b["libraries"]["lucene"].startswith("9.")
    assert b["doc_count"] == N_DOCS and b["corpus_checksum"] == m["corpus_checksum"]


def test_index_built_with_another_model_is_refused(copy_dir: Path, minilm: Any) -> None:
    path = copy_dir / "dense" / mf.MANIFEST_NAME
    manifest = json.loads(path.read_text())
    manifest["settings"]["model"] = "acme/tiny-random-encoder"
    path.write_text(json.dumps(manifest))
    ctx = context_for(copy_dir, minilm)
    for action in (lambda: dense(ctx).build(ctx.store), lambda: search(dense(ctx), "cells")):
        with pytest.raises(IndexMismatchError) as err:
            action()
        message = str(err.value)
        assert "model" in message and "acme/tiny-random-encoder" in message and MINILM in message
        assert "--rebuild" in message


def test_pipeline_asking_for_another_setting_is_refused(ctx: PipelineContext) -> None:
    with pytest.raises(IndexMismatchError, match="index_type = 'flat'.*'hnsw'"):
        dense(ctx, index_type="hnsw").build(ctx.store)
    with pytest.raises(IndexMismatchError, match="stemmer"):
        search(bm25(ctx, stemmer="krovetz"), "cells")
    # an alias of the same model is the same model
    dense(ctx, model="all-MiniLM-L6-v2").build(ctx.store)


def test_index_of_another_corpus_is_refused(copy_dir: Path, minilm: Any, docs: list[Document]) -> None:
    ctx = context_for(copy_dir, minilm)
    ctx.store.upsert([Document(docs[0].id, docs[0].text + " (revised)", docs[0].title)])
    with pytest.raises(IndexMismatchError, match="another corpus"):
        bm25(ctx).build(ctx.store)


def test_missing_index_says_how_to_build_it(tmp_path: Path, minilm: Any) -> None:
    ctx = context_for(tmp_path / "empty", minilm)
    for stage in (bm25(ctx), dense(ctx)):
        with pytest.raises(IndexMissingError, match="streamrank index --pipeline"):
            search(stage, "cells")


# ---- incremental updates -------------------------------------------------------------------------
def test_add_and_delete_without_rebuild(
    copy_dir: Path, tmp_path: Path, minilm: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    pipeline = load_pipeline(write_pipeline(tmp_path, HYBRID), index_dir=copy_dir)
    pipeline.context.shared(("sentence-encoder", MINILM), lambda: minilm)
    counter = EncodeCounter(monkeypatch)
    bm25_stage, dense_stage = pipeline.stages[0].children  # type: ignore[attr-defined]
    query = "axolotl limb regeneration in microgravity"

    pipeline.add_documents([NEW_DOC])
    assert counter.docs == 1  # only the new document was encoded
    for stage in (bm25_stage, dense_stage):
        assert search(stage, query)[0].candidates[0].doc_id == NEW_DOC.id
        assert stage.manifest()["doc_count"] == N_DOCS + 1
        assert stage.manifest()["corpus_checksum"] == pipeline.context.store.checksum()
    top = pipeline.search(query, k=3).candidates[0]
    assert top.doc_id == NEW_DOC.id and top.document == NEW_DOC
    assert set(top.stage_scores) == {"bm25", "dense", "fusion"}

    # replacing a document: the old text is no longer found, the new one is
    changed = Document(NEW_DOC.id, "Tardigrades survive the vacuum of space.", "Tardigrade survival")
    pipeline.add_documents([changed])
    assert dense_stage.manifest()["info"]["masked_rows"] == 1
    for stage in (bm25_stage, dense_stage):
        assert stage.manifest()["doc_count"] == N_DOCS + 1
        assert search(stage, "tardigrades in the vacuum of space")[0].candidates[0].doc_id == NEW_DOC.id
    assert NEW_DOC.id not in search(bm25_stage, query)[0].doc_ids()  # no term of the old text left
    hits = [c for c in search(dense_stage, query)[0].candidates if c.doc_id == NEW_DOC.id]
    q = dense_stage.encode_queries([query])[0]
    assert len(hits) <= 1  # the old row is masked, never returned beside the new one
    assert all(
        h.score == pytest.approx(float(dense_stage.encode_documents([changed])[0] @ q), abs=1e-4)
        for h in hits
    )

    pipeline.delete_documents([NEW_DOC.id])
    for stage in (bm25_stage, dense_stage):
        assert NEW_DOC.id not in search(stage, "tardigrades in the vacuum of space")[0].doc_ids()
        assert stage.manifest()["doc_count"] == N_DOCS
        assert NEW_DOC.id not in stage.indexed_ids() and len(stage.indexed_ids()) == N_DOCS
    assert len(search(dense_stage, query)[0].candidates) == 50  # masked rows do not shorten results

    # the indexes still match the corpus: index() keeps them and encodes nothing
    counter.docs = 0
    pipeline.index()
    assert counter.docs == 0
    for stage in (bm25_stage, dense_stage):
        assert stage.manifest()["corpus_checksum"] == pipeline.context.store.checksum()
    pipeline.close()


def test_other_instance_sees_updates(copy_dir: Path, minilm: Any) -> None:
    """A second stage on the same folder (another pipeline, or the service) reopens after a change."""
    writer_ctx, reader_ctx = context_for(copy_dir, minilm), context_for(copy_dir, minilm)
    reader = bm25(reader_ctx)
    assert NEW_DOC.id not in search(reader, "axolotl microgravity")[0].doc_ids()
    writer_ctx.store.upsert([NEW_DOC])
    bm25(writer_ctx).add([NEW_DOC])
    assert search(reader, "axolotl microgravity")[0].candidates[0].doc_id == NEW_DOC.id


def test_concurrent_searches_during_updates(copy_dir: Path, minilm: Any, docs: list[Document]) -> None:
    ctx = context_for(copy_dir, minilm)
    stage = bm25(ctx, k=5)
    errors: list[BaseException] = []

    def searching() -> None:
        try:
            for i in range(20):
                assert search(stage, docs[i].title)[0].candidates[0].doc_id == docs[i].id
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=searching) for _ in range(3)]
    for t in threads:
        t.start()
    for i in range(3):
        extra = Document(f"extra-{i}", f"extra document number {i}")
        ctx.store.upsert([extra])
        stage.add([extra])
    for t in threads:
        t.join()
    assert not errors
    assert stage.manifest()["doc_count"] == N_DOCS + 3


def test_failed_rebuild_leaves_the_old_index(
    copy_dir: Path, minilm: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    ctx = context_for(copy_dir, minilm)
    before = mf.read_manifest(copy_dir / "bm25")

    def crash(self: BM25Retriever, folder: Path, documents: list[Document]) -> dict[str, Any]:
        (folder / "_0.cfs").write_bytes(b"half written")
        raise RuntimeError("disk full")

    monkeypatch.setattr(BM25Retriever, "_write", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        bm25(ctx).build(ctx.store, rebuild=True)
    monkeypatch.undo()
    assert mf.read_manifest(copy_dir / "bm25") == before
    assert not list(copy_dir.glob("bm25.*"))
    assert search(bm25(ctx), "cells")[0].candidates


def test_failed_update_is_not_half_applied(
    copy_dir: Path, minilm: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    ctx = context_for(copy_dir, minilm)
    stage = dense(ctx)
    ctx.store.upsert([NEW_DOC])

    def crash(self: DenseRetriever, folder: Path) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(DenseRetriever, "_persist", crash)
    with pytest.raises(OSError, match="disk full"):
        stage.add([NEW_DOC])
    monkeypatch.undo()
    assert NEW_DOC.id not in stage.indexed_ids() and len(stage.indexed_ids()) == N_DOCS
    assert NEW_DOC.id not in search(stage, "axolotl limb regeneration")[0].doc_ids()
    stage.add([NEW_DOC])  # and a retry works
    assert search(stage, "axolotl limb regeneration")[0].candidates[0].doc_id == NEW_DOC.id


# ---- fusion --------------------------------------------------------------------------------------
class FixedConfig(StageConfig):
    hits: list[tuple[str, float]]


class Fixed(BaseStage):
    """Test retriever: returns a fixed list (or, given a pool, the pool members in that list)."""

    Config = FixedConfig
    is_retriever = True

    def run(self, rankings: Sequence[Ranking]) -> list[Ranking]:
        out = []
        for r in rankings:
            hits = dict(self.config.hits)
            pool = r.candidates or [Candidate(d, 0.0) for d in hits]
            out.append(r.rescored(self.name, hits, keep=self.config.k, candidates=pool))
        return out


@pytest.fixture
def fixed_kind(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(registry.STAGE_KINDS, "fixed", f"{__name__}:Fixed")


def fusion(options: dict[str, Any]) -> FusionStage:
    return FusionStage.from_dict({"kind": "fusion", **options}, PipelineContext(None))  # type: ignore[return-value]


A = [("a", 9.0), ("b", 5.0), ("c", 1.0)]
B = [("c", 0.9), ("d", 0.8), ("a", 0.1)]


def test_rrf_matches_hand_computation(fixed_kind: None) -> None:
    stage = fusion(
        {
            "retrievers": [
                {"kind": "fixed", "name": "one", "hits": A},
                {"kind": "fixed", "name": "two", "hits": B},
            ]
        }
    )
    ranked = stage.run([Ranking(query=Query("q", "x"))])[0]
    expected = {"a": 1 / 61 + 1 / 63, "b": 1 / 62, "c": 1 / 63 + 1 / 61, "d": 1 / 62}
    assert ranked.doc_ids() == ["a", "c", "b", "d"]  # ties broken by doc id, as pyserini
    for cand in ranked.candidates:
        assert cand.score == pytest.approx(expected[cand.doc_id])
        assert cand.stage_scores["fusion"] == pytest.approx(expected[cand.doc_id])
    by_id = {c.doc_id: c for c in ranked.candidates}
    assert by_id["a"].stage_scores["one"] == 9.0 and by_id["a"].stage_scores["two"] == 0.1
    assert "two" not in by_id["b"].stage_scores
    assert {"one", "two"} <= set(ranked.timings_ms)
    assert [c.doc_id for c in stage.children[0].run([Ranking(query=Query("q", "x"))])[0].candidates] == [
        "a",
        "b",
        "c",
    ]


def test_rrf_k_and_weights() -> None:
    fused = fuse([A, B], "rrf", rrf_k=0, weights=[2.0, 1.0])
    assert fused == pytest.approx({"a": 2 / 1 + 1 / 3, "b": 2 / 2, "c": 2 / 3 + 1 / 1, "d": 1 / 2})


def test_minmax_and_zscore_by_hand() -> None:
    minmax = fuse([A, B], "minmax")
    assert minmax == pytest.approx({"a": 1.0 + 0.0, "b": 0.5, "c": 0.0 + 1.0, "d": 0.875})
    za = {"a": 1.2247449, "b": 0.0, "c": -1.2247449}  # (s - mean) / population std
    zb = dict(zip("cda", np.array([0.9, 0.8, 0.1]) - 0.6, strict=True))
    zb = {k: v / float(np.std([0.9, 0.8, 0.1])) for k, v in zb.items()}
    z = fuse([A, B], "zscore")
    assert z["a"] == pytest.approx(za["a"] + zb["a"])
    assert z["b"] == pytest.approx(za["b"] + min(zb.values()))  # missing: the run's lowest z
    assert z["d"] == pytest.approx(min(za.values()) + zb["d"])


def test_fusion_scores_a_supplied_pool_only(fixed_kind: None) -> None:
    stage = fusion(
        {
            "retrievers": [
                {"kind": "fixed", "name": "one", "hits": A},
                {"kind": "fixed", "name": "two", "hits": B},
            ]
        }
    )
    pool = [Candidate("b", 0.0), Candidate("d", 0.0)]
    ranked = stage.run([Ranking(query=Query("q", "x"), candidates=pool)])[0]
    assert sorted(ranked.doc_ids()) == ["b", "d"]


def test_fusion_config_errors(fixed_kind: None) -> None:
    with pytest.raises(ConfigError, match="2 weights for 1 retrievers"):
        fusion({"retrievers": [{"kind": "fixed", "hits": A}], "weights": [1, 2]})
    with pytest.raises(ConfigError, match="unique"):
        fusion({"retrievers": [{"kind": "fixed", "hits": A}, {"kind": "fixed", "hits": B}]})
    with pytest.raises(ConfigError, match="unknown key 'nope'"):
        fusion({"retrievers": [{"kind": "fixed", "hits": A, "nope": 1}]})


def test_hybrid_pipeline_fuses_bm25_and_dense(
    copy_dir: Path, tmp_path: Path, minilm: Any, docs: list[Document]
) -> None:
    pipeline = load_pipeline(write_pipeline(tmp_path, HYBRID), index_dir=copy_dir)
    pipeline.context.shared(("sentence-encoder", MINILM), lambda: minilm)
    assert [s.name for s in pipeline.iter_stages()] == ["fusion", "bm25", "dense"]
    ranking = pipeline.search(docs[30].title, k=10)
    assert ranking.candidates[0].doc_id == docs[30].id
    assert {"fusion", "bm25", "dense"} <= set(ranking.timings_ms)
    bm = {
        c.doc_id: r
        for r, c in enumerate(search(pipeline.stages[0].children[0], docs[30].title)[0].candidates, 1)
    }
    de = {
        c.doc_id: r
        for r, c in enumerate(search(pipeline.stages[0].children[1], docs[30].title)[0].candidates, 1)
    }
    for cand in ranking.candidates:
        expected = sum(1 / (60 + ranks[cand.doc_id]) for ranks in (bm, de) if cand.doc_id in ranks)
        assert cand.score == pytest.approx(expected)
    pipeline.close()


def test_shipped_configs_load(tmp_path: Path) -> None:
    for name in ("bm25", "dense", "hybrid"):
        pipeline = load_pipeline(name, index_dir=tmp_path / name)
        assert isinstance(pipeline, Pipeline) and pipeline.stages[0].is_retriever


# ---- process-level ------------------------------------------------------------------------------
def test_ensure_jvm_is_idempotent() -> None:
    from streamrank.index.jvm import ensure_jvm

    ensure_jvm()
    ensure_jvm()
    from jnius import autoclass

    assert autoclass("org.apache.lucene.util.Version").LATEST.major >= 9


def test_index_modules_import_no_heavy_libraries() -> None:
    code = (
        "import sys, streamrank.index.bm25, streamrank.index.dense, streamrank.index.fusion, "
        "streamrank.index.manifest, streamrank.index.jvm\n"
        "heavy = [m for m in ('torch', 'faiss', 'pyserini', 'jnius', 'sentence_transformers') if m in sys.modules]\n"
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


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
