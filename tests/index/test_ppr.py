"""The ppr stage: seeding, expansion, solvers, updates, user edges, lexical (BM25) neighbours."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from ppr_support import corpus, make_stage, ppr_stage

from streamrank.context import PipelineContext
from streamrank.errors import ConfigError, IndexMismatchError, IndexMissingError
from streamrank.index import manifest as mf
from streamrank.index.graph import read_edge_list
from streamrank.index.ppr import PPRStage
from streamrank.types import Candidate, Document, Query, Ranking


# ---- the stage --------------------------------------------------------------------------------------
def test_stage_expands_the_pool_and_scores_every_candidate(tmp_path: Path) -> None:
    stage = make_stage(tmp_path, expand=5, k=10)
    pool = [Candidate(doc_id=d, score=1.0 / (i + 1), rank=i + 1) for i, d in enumerate(["a0", "a1", "b0"])]
    (out,) = stage.run([Ranking(query=Query(id="q", text="cell"), candidates=pool)])
    ids = out.doc_ids()
    assert {"a0", "a1", "b0"} <= set(ids) and len(ids) == 8
    added = [c for c in out.candidates if c.doc_id not in {"a0", "a1", "b0"}]
    assert all(c.document is None for c in added)
    assert sum(c.doc_id.startswith("a") for c in added) >= 3  # neighbours of the stronger seeds
    assert all(c.stage_scores["ppr"] > 0 and "ppr_fused" in c.stage_scores for c in out.candidates)
    assert out.candidates[0].doc_id == "a0"


def test_user_history_alone_generates_candidates_and_mixes_with_seeds(tmp_path: Path) -> None:
    stage = make_stage(tmp_path, expand=5, k=6, history_weight=0.8)
    (recommend,) = stage.run([Ranking(query=Query(id="q", text="x", user_history=("c2",)))])
    assert recommend.doc_ids()[0] == "c2" and sum(d.startswith("c") for d in recommend.doc_ids()) >= 5
    pool = [Candidate(doc_id=d, score=1.0, rank=i + 1) for i, d in enumerate(["b0", "b1"])]
    plain, personal = stage.run(
        [
            Ranking(query=Query(id="q1", text="x"), candidates=pool),
            Ranking(query=Query(id="q2", text="x", user_history=("c2", "c3")), candidates=pool),
        ]
    )
    assert not any(d.startswith("c") for d in plain.doc_ids())
    assert sum(d.startswith("c") for d in personal.doc_ids()) >= 3
    stage.config.history_fusion_weight = 1.0  # history requests ranked by PPR alone
    (by_history,) = stage.run([Ranking(query=Query(id="q", text="x", user_history=("c2",)), candidates=pool)])
    assert by_history.doc_ids()[0] == "c2"


def test_power_and_montecarlo_stages_agree(tmp_path: Path) -> None:
    pool = [Candidate(doc_id=d, score=1.0, rank=i + 1) for i, d in enumerate(["a0", "a3", "b1"])]
    ranking = Ranking(query=Query(id="q", text="x"), candidates=pool)
    power = make_stage(tmp_path, expand=6, fusion="ppr_only").run([ranking])[0]
    mc = make_stage(tmp_path, expand=6, fusion="ppr_only", solver="montecarlo", walks=2000).run([ranking])[0]
    exact = {c.doc_id: c.stage_scores["ppr"] for c in power.candidates}
    approx = {c.doc_id: c.stage_scores["ppr"] for c in mc.candidates}
    assert set(power.doc_ids()[:5]) == set(mc.doc_ids()[:5])
    for doc_id in set(exact) & set(approx):
        assert approx[doc_id] == pytest.approx(exact[doc_id], abs=0.02)
    assert list((tmp_path / "idx" / "graph").glob("fingerprints-*.npz"))


@pytest.mark.parametrize("solver", ["power", "montecarlo"])
def test_added_document_appears_in_the_graph_and_delete_removes_it(tmp_path: Path, solver: str) -> None:
    stage = make_stage(tmp_path, solver=solver, walks=32, expand=3)
    new = Document(id="a-new", text="membrane protein receptor cell")
    stage.context.store.upsert([new])
    stage.add([new])
    assert stage.staleness() == 1 and "a-new" not in stage._solved.graph.row_of  # logged, not yet walked
    assert mf.read_manifest(stage.folder)["info"]["staleness"] == 1
    reopened = ppr_stage(stage.context, neighbors=3, solver=solver)
    assert "a-new" in reopened.indexed_ids()  # persisted in the log, replayed on open
    stage.refresh()
    assert stage.staleness() == 0 and mf.read_manifest(stage.folder)["info"]["staleness"] == 0
    graph = stage._solved.graph
    row = graph.row_of["a-new"]
    neighbours = {graph.ids[c] for c in graph.knn[row].indices}
    assert len(neighbours) >= 3 and all(n.startswith("a") for n in neighbours)
    assert all(graph.knn[graph.row_of[n], row] > 0 for n in neighbours)  # linked both ways
    if solver == "montecarlo":
        F = stage._solved.fingerprints
        assert F.shape == (len(graph), len(graph)) and F[row, row] >= 0.15 - 1e-6

    reopened = ppr_stage(stage.context, neighbors=3, solver=solver)
    pool = [Candidate(doc_id=n, score=1.0, rank=i + 1) for i, n in enumerate(sorted(neighbours))]
    (out,) = reopened.run([Ranking(query=Query(id="q", text="x"), candidates=pool)])
    assert "a-new" in out.doc_ids()

    stage.delete(["a-new", "b0"])
    assert "a-new" not in stage.indexed_ids() and "b0" not in stage.indexed_ids()
    (out,) = stage.run([Ranking(query=Query(id="q", text="x"), candidates=pool)])
    assert "a-new" not in out.doc_ids()  # tombstoned: filtered at walk time, before any refresh
    stage.refresh()
    assert stage._solved.graph.knn.shape == (len(corpus()) - 1,) * 2


def test_user_edges_join_the_graph(tmp_path: Path) -> None:
    edges = tmp_path / "citations.txt"
    edges.write_text("# citing cited weight\na0 b5 2.0\nb5\ta0\nunknown a1\n")
    assert read_edge_list(edges)[0] == ("a0", "b5", 2.0)
    stage = make_stage(tmp_path, edges=str(edges), edge_weight=5.0, expand=2, fusion="ppr_only")
    pool = [Candidate(doc_id="a0", score=1.0, rank=1)]
    (out,) = stage.run([Ranking(query=Query(id="q", text="x"), candidates=pool)])
    assert out.doc_ids()[1] == "b5"  # the citation outweighs every kNN edge
    graph = stage._solved.graph
    assert graph.user_matrix()[1] == 1  # the edge naming an unknown document is skipped


def test_missing_graph_is_a_clear_error(tmp_path: Path) -> None:
    context = PipelineContext(tmp_path / "idx", corpus="toy")
    stage = ppr_stage(context)
    with pytest.raises(IndexMissingError, match="streamrank index"):
        stage.run([Ranking(query=Query(id="q", text="x"), candidates=[Candidate(doc_id="a0", score=1.0)])])


def test_adding_a_document_rewalks_only_the_fingerprints_it_affects(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    vocab = [f"w{i}" for i in range(300)]
    docs = [Document(id=f"d{i}", text=" ".join(rng.choice(vocab, 6))) for i in range(400)]
    context = PipelineContext(tmp_path / "idx", corpus="toy")
    context.store.upsert(docs)
    stage = ppr_stage(context, neighbors=3, solver="montecarlo", walks=8, alpha=0.5)
    stage.build(context.store)
    stage.run([Ranking(query=Query(id="q", text="x"), candidates=[Candidate(doc_id="d0", score=1.0)])])
    before = stage._solved.fingerprints.copy()
    new = Document(id="fresh", text=docs[7].text)
    context.store.upsert([new])
    stage.add([new])
    stage.refresh()
    after = stage._solved.fingerprints
    assert after.shape == (401, 401) and after[400, 400] >= 0.5 - 1e-6
    same = [(before[i] != after[i, :400]).nnz == 0 for i in range(400)]
    assert 0.5 < np.mean(same) < 1.0  # most rows kept, the ones near the new document re-walked
    assert not same[7]


# ---- lexical (BM25) neighbours, real Lucene -------------------------------------------------------
@pytest.fixture
def lexical_stage(tmp_path: Path) -> PPRStage:
    """The toy corpus with a real BM25 index and a ppr stage linking 2 lexical neighbours per document."""
    from streamrank.index.bm25 import BM25Retriever

    context = PipelineContext(tmp_path / "idx", corpus="toy")
    context.store.upsert(corpus())
    bm25 = BM25Retriever.from_dict({"kind": "bm25"}, context)
    bm25.build(context.store)
    stage = ppr_stage(context, neighbors=3, lexical_neighbors=2)
    stage.bind("lexical_from", bm25)
    stage.build(context.store)
    yield stage  # type: ignore[misc]
    context.close()


def bm25_top(stage: PPRStage, text: str, skip: str, k: int) -> list[str]:
    """The top ``k`` ids pyserini's searcher gives for ``text``, ``skip`` left out."""
    bm25 = stage.bm25()
    bm25._ensure_open()
    return [h.docid for h in bm25._searcher.search(text, k=k + 1) if h.docid != skip][:k]


@pytest.mark.slow
def test_lexical_neighbours_are_the_bm25_top_hits(lexical_stage: PPRStage) -> None:
    stage = lexical_stage
    stage._ensure_open()
    graph = stage._solved.graph
    L = graph.lexical
    assert L.nnz and (L != L.T).nnz == 0 and L.diagonal().sum() == 0
    for doc in corpus():
        row = graph.row_of[doc.id]
        top = bm25_top(stage, doc.contents, doc.id, 2)
        assert all(L[row, graph.row_of[t]] > 0 for t in top)  # its own hits, and the best weighs 1
        assert L[row, graph.row_of[top[0]]] == pytest.approx(1.0)
    settings = mf.read_manifest(stage.folder)["settings"]
    assert settings["lexical"] == {
        "neighbors": 2,
        "bm25_index": "bm25",
        "k1": 0.9,
        "b": 0.4,
        "query_terms": 300,
    }
    assert mf.read_manifest(stage.folder)["info"]["lexical_edges"] == L.nnz
    # the lexical edges take part in PPR, with their weight
    P_without = stage._solve_state(graph).P.copy()
    stage.config.lexical_weight = 0.0
    assert (stage._solve_state(graph).P != P_without).nnz > 0
    # another setting is another index
    for lexical in (3, 0):
        other = ppr_stage(stage.context, neighbors=3, lexical_neighbors=lexical)
        other.bind("lexical_from", stage.bm25())
        with pytest.raises(IndexMismatchError, match="lexical"):
            other.indexed_ids()


@pytest.mark.slow
def test_added_document_gets_lexical_edges_and_delete_drops_them(lexical_stage: PPRStage) -> None:
    stage = lexical_stage
    new = Document(id="c-new", text="vaccine antibody immune trial antibody")
    stage.context.store.upsert([new])
    stage.bm25().add([new])  # the pipeline's BM25 stage comes first
    stage.add([new])
    stage.refresh()
    graph = stage._solved.graph
    row = graph.row_of["c-new"]
    top = bm25_top(stage, new.contents, new.id, 2)
    assert {graph.ids[c] for c in graph.lexical[row].indices} >= set(top)
    assert all(t.startswith("c") and graph.lexical[graph.row_of[t], row] > 0 for t in top)  # both ways
    assert mf.read_manifest(stage.folder)["info"]["lexical_edges"] == graph.lexical.nnz
    stage.delete(["c-new"])
    stage.refresh()
    assert stage._solved.graph.lexical.shape == (len(corpus()),) * 2


def test_lexical_neighbours_need_a_bm25_index(tmp_path: Path) -> None:
    context = PipelineContext(tmp_path / "idx", corpus="toy")
    from streamrank.index.bm25 import BM25Retriever

    context.store.upsert(corpus())
    stage = ppr_stage(context, lexical_neighbors=16)
    stage.bind("lexical_from", BM25Retriever.from_dict({"kind": "bm25"}, context))
    with pytest.raises(ConfigError, match="BM25 index 'bm25'.*streamrank index"):
        stage.build(context.store)


def test_pipeline_retrieving_with_bm25_keeps_the_declared_dense_index_ppr_reads(
    tmp_path: Path, tiny_dataset: Path
) -> None:
    """Real BM25 + MiniLM: `index` builds the dense index the graph links (declared under [[indexes]], never
    run on a query); an added document reaches both. Without the declaration the file is refused."""
    import streamrank

    config = tmp_path / "p.toml"
    head = f'name = "bm25-ppr"\ncorpus = "{tiny_dataset}"\nindex_dir = "{tmp_path / "idx"}"\n'
    stages = '[[stages]]\nkind = "bm25"\nk = 10\n[[stages]]\nkind = "ppr"\nneighbors = 3\nk = 10\n'
    config.write_text(head + stages)
    with pytest.raises(ConfigError, match="'ppr': vectors_from = 'dense' names no other stage.*bm25"):
        streamrank.load_pipeline(config)
    config.write_text(head + '[[indexes]]\nkind = "dense"\n' + stages)
    pipeline = streamrank.load_pipeline(config)
    try:
        names = [s.name for s in pipeline.iter_stages()]
        assert names == ["dense", "bm25", "ppr"]  # the dense index before the graph built from it
        assert [s.name for s in pipeline.stages] == ["bm25", "ppr"]
        pipeline.index()
        assert mf.read_manifest(tmp_path / "idx" / "dense")["doc_count"] == 80
        pipeline.add_documents([Document(id="new", text="topic3 key answer again")])
        (ppr,) = [s for s in pipeline.stages if isinstance(s, PPRStage)]
        assert "new" in ppr._live_ids() and "new" in pipeline.search("topic3 question", k=10).doc_ids()
    finally:
        pipeline.close()
