"""PPR solvers against networkx: power iteration and Monte Carlo fingerprints."""

from __future__ import annotations

import networkx as nx
import numpy as np
import pytest
import scipy.sparse as sp

from streamrank.index.ppr_solvers import (
    build_fingerprints,
    fingerprint_ppr,
    power_iteration,
    transition_matrix,
)


# ---- solvers ------------------------------------------------------------------------------------
def weighted_graph(n: int = 30, dangling: bool = False) -> nx.DiGraph:
    graph = nx.gnm_random_graph(n, 3 * n, seed=1, directed=True)
    if not dangling:
        graph.add_edges_from((i, (i + 1) % n) for i in range(n))
    for u, v in graph.edges:
        graph[u][v]["weight"] = 1.0 + (7 * u + v) % 5
    return graph


def as_arrays(graph: nx.DiGraph, personalization: dict[int, float]) -> tuple[sp.csr_matrix, np.ndarray]:
    n = graph.number_of_nodes()
    seeds = np.zeros(n)
    for node, mass in personalization.items():
        seeds[node] = mass
    return nx.to_scipy_sparse_array(graph, nodelist=range(n), weight="weight"), seeds


def networkx_ppr(graph: nx.DiGraph, personalization: dict[int, float]) -> np.ndarray:
    ref = nx.pagerank(graph, alpha=0.85, personalization=personalization, tol=1e-13, max_iter=2000)
    return np.array([ref[i] for i in range(graph.number_of_nodes())])


@pytest.mark.parametrize("dangling", [False, True])
def test_power_iteration_matches_networkx(dangling: bool) -> None:
    graph = weighted_graph(dangling=dangling)
    first, second = {0: 0.5, 3: 0.3, 7: 0.2}, {12: 1.0}
    adjacency, s1 = as_arrays(graph, first)
    _, s2 = as_arrays(graph, second)
    P, dangling_mask = transition_matrix(adjacency)
    assert dangling_mask.any() == dangling
    batch = power_iteration(P, np.stack([s1, s2], axis=1), tol=1e-12, max_iter=2000)
    np.testing.assert_allclose(batch[:, 0], networkx_ppr(graph, first), atol=1e-9)
    np.testing.assert_allclose(batch[:, 1], networkx_ppr(graph, second), atol=1e-9)
    np.testing.assert_allclose(power_iteration(P, s1, tol=1e-12, max_iter=2000), batch[:, 0])


def test_fingerprints_converge_to_the_exact_answer_as_walks_grow() -> None:
    graph = weighted_graph()
    personalization = {0: 0.5, 3: 0.3, 7: 0.2}
    adjacency, seeds = as_arrays(graph, personalization)
    exact = networkx_ppr(graph, personalization)
    P, _ = transition_matrix(adjacency)
    errors, refined = [], []
    for walks in (16, 256, 4096):
        F = build_fingerprints(P, walks=walks, max_length=200, seed=0)
        S = sp.csr_matrix(seeds[None, :])
        errors.append(np.abs(fingerprint_ppr(F, S).toarray()[0] - exact).sum())
        refined.append(np.abs(fingerprint_ppr(F, S, P=P, refine_steps=2).toarray()[0] - exact).sum())
    np.testing.assert_allclose(np.asarray(F.sum(axis=1)).ravel(), 1.0, atol=0.1)  # visit mass ~ 1 per row
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 0.03
    assert all(r < e for r, e in zip(refined, errors, strict=True))  # PowerWalk's online steps help


def test_fingerprints_of_a_subset_and_row_replacement() -> None:
    adjacency, _ = as_arrays(weighted_graph(), {0: 1.0})
    P, _ = transition_matrix(adjacency)
    F = build_fingerprints(P, walks=64, seed=1)
    part = build_fingerprints(P, walks=64, seed=2, sources=np.array([4, 9]))
    assert part.shape == (2, 30) and part[0, 4] >= 0.15 - 1e-6 and part[1, 9] >= 0.15 - 1e-6
    from streamrank.index.ppr_solvers import replace_rows

    G = replace_rows(F, np.array([4, 9]), part)
    assert (G[4] != part[0]).nnz == 0 and (G[0] != F[0]).nnz == 0
