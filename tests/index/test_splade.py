"""SPLADE stage with splade-tiny on real Lucene: index, search, supplied pools, add/delete, fusion."""

from __future__ import annotations

from pathlib import Path

import pytest
from index_support import NEW_DOC, PROBES

from streamrank.compose import load_pipeline
from streamrank.errors import ModelNotFoundError
from streamrank.index.splade import SpladeRetriever, dot
from streamrank.models import resolve_model
from streamrank.pipeline import candidate_pool
from streamrank.types import Document

pytestmark = pytest.mark.slow
SPLADE = "splade-tiny"


@pytest.fixture(scope="module")
def splade_pipeline(tmp_path_factory: pytest.TempPathFactory, docs: list[Document]):
    try:
        resolve_model(SPLADE)
    except ModelNotFoundError:
        pytest.skip(f"{SPLADE} not fetched: run `make models MODELS=splade`")
    folder = tmp_path_factory.mktemp("splade")
    corpus = folder / "corpus"
    (corpus / "qrels").mkdir(parents=True)
    import json

    (corpus / "corpus.jsonl").write_text("".join(json.dumps({"_id": d.id, "title": d.title, "text": d.text}) + "\n" for d in docs[:120]))
    (corpus / "queries.jsonl").write_text(json.dumps({"_id": "q", "text": "x"}) + "\n")
    (corpus / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n")
    config = folder / "splade.toml"
    config.write_text(
        'name = "splade"\n[[stages]]\nkind = "fusion"\nk = 50\n'
        '  [[stages.retrievers]]\n  kind = "bm25"\n  k = 50\n'
        f'  [[stages.retrievers]]\n  kind = "splade"\n  model = "{SPLADE}"\n  k = 50\n'
    )
    pipeline = load_pipeline(config, corpus=str(corpus), index_dir=folder / "index")
    pipeline.index()
    yield pipeline, docs[:120]
    pipeline.close()


def splade_stage(pipeline) -> SpladeRetriever:
    return next(s for s in pipeline.iter_stages() if isinstance(s, SpladeRetriever))


def test_search_scores_are_dot_products_of_the_quantized_vectors(splade_pipeline) -> None:
    pipeline, docs = splade_pipeline
    stage = splade_stage(pipeline)
    by_id = {d.id: d for d in docs}
    assert sorted(stage.indexed_ids()) == sorted(by_id)
    found_self = 0
    for i in [p for p in PROBES if p < len(docs)]:
        query = docs[i].title
        [ranking] = stage.run_top([candidate_pool(query, [])], 10)
        scores = [c.score for c in ranking.candidates]
        assert scores == sorted(scores, reverse=True) and scores[0] > 0
        qvec = stage.encoder.encode(query)
        top = ranking.candidates[:3]
        vectors = stage.encoder.encode_many([by_id[c.doc_id].contents for c in top])
        assert [c.score for c in top] == pytest.approx([dot(qvec, v) for v in vectors])
        found_self += docs[i].id in ranking.doc_ids()
    assert found_self >= 1  # a title usually finds its own abstract, even with a 2-layer model


def test_supplied_pool_scored_on_the_index_scale(splade_pipeline) -> None:
    pipeline, docs = splade_pipeline
    stage = splade_stage(pipeline)
    query = docs[0].title
    [searched] = stage.run_top([candidate_pool(query, [])], 5)
    pool = candidate_pool(query, [d for d in docs if d.id in searched.doc_ids()][::-1])
    [rescored] = stage.run([pool])
    assert {c.doc_id: c.score for c in rescored.candidates} == pytest.approx(
        {c.doc_id: c.score for c in searched.candidates}
    )


def test_add_and_delete_reach_the_impact_index(splade_pipeline) -> None:
    pipeline, _ = splade_pipeline
    stage = splade_stage(pipeline)
    query = NEW_DOC.title
    pipeline.add_documents([NEW_DOC])
    assert NEW_DOC.id in stage.indexed_ids()
    [ranking] = stage.run_top([candidate_pool(query, [])], 3)
    assert ranking.doc_ids()[0] == NEW_DOC.id
    fused = pipeline.search(query, k=3)
    assert fused.doc_ids()[0] == NEW_DOC.id and "splade" in fused.candidates[0].stage_scores
    pipeline.delete_documents([NEW_DOC.id])
    assert NEW_DOC.id not in stage.indexed_ids()
    assert NEW_DOC.id not in stage.run_top([candidate_pool(query, [])], 10)[0].doc_ids()


def test_reopening_the_index_serves_the_same_ranking(splade_pipeline, tmp_path: Path) -> None:
    pipeline, docs = splade_pipeline
    before = pipeline.search(docs[5].title, k=10)
    again = load_pipeline(pipeline.source, corpus=pipeline.context.corpus, index_dir=pipeline.context.index_dir)
    try:
        assert again.search(docs[5].title, k=10).doc_ids() == before.doc_ids()
    finally:
        again.close()
