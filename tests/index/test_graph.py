"""The corpus graph: kNN links, relinking a replaced document, personalised query vectors."""

from __future__ import annotations

import numpy as np
import pytest
from ppr_support import TOPICS, corpus, embed

from streamrank.index.graph import CorpusGraph, LiveGraph, knn_edges, personalised_query


# ---- the graph --------------------------------------------------------------------------------------
def test_knn_graph_links_documents_of_one_topic() -> None:
    docs = corpus()
    graph = CorpusGraph.from_embeddings(
        [d.id for d in docs], np.stack([embed(d.text) for d in docs]), neighbors=3
    )
    A = graph.knn
    assert (A != A.T).nnz == 0 and A.diagonal().sum() == 0
    rows, cols = A.nonzero()
    same = [graph.ids[r][0] == graph.ids[c][0] for r, c in zip(rows, cols, strict=True)]
    assert np.mean(same) > 0.9
    assert min(np.diff(A.indptr)) >= 3


def test_replacing_a_document_relinks_it() -> None:
    docs = corpus()
    ids = [d.id for d in docs]
    vectors = np.stack([embed(d.text) for d in docs])
    graph = CorpusGraph.from_embeddings(ids, vectors, neighbors=3)
    moved = embed(TOPICS["c"])
    base = vectors.copy()
    base[ids.index("a0")] = moved
    live = LiveGraph(graph)  # a write as the ppr stage logs it: the node, then its new kNN edges
    r, c, w = knn_edges(moved[None, :], base, 3, query_rows=np.array([ids.index("a0")]))
    edges = [("a0", "", LiveGraph.NODE)] + [(ids[a], ids[b], LiveGraph.KNN) for a, b in zip(r, c, strict=True)]
    live.apply(edges, [0.0, *w.tolist()])
    graph, changed, _ = live.snapshot()
    row = graph.row_of["a0"]
    assert len(graph) == len(docs) and row in changed
    assert {graph.ids[c][0] for c in graph.knn[row].indices} == {"c"}
    assert not any(graph.ids[r].startswith("a") for r in graph.knn[:, row].tocoo().row)


def test_personalised_query_mixes_and_normalises() -> None:
    q = np.array([1.0, 0.0, 0.0], dtype=np.float32)
    history = np.array([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]], dtype=np.float32)
    mixed = personalised_query(q, history, 0.5)
    assert np.isclose(np.linalg.norm(mixed), 1.0)
    assert mixed[0] > mixed[1] > 0 and mixed[1] == pytest.approx(mixed[2])
    np.testing.assert_array_equal(personalised_query(q, history[:0], 0.5), q)
    batch = personalised_query(np.stack([q, q]), history, 0.5)
    np.testing.assert_allclose(batch, np.stack([mixed, mixed]))
    np.testing.assert_array_equal(personalised_query(q, history, 0.0), q)
