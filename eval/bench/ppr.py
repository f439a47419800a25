"""`streamrank bench ppr`: PPR solvers side by side, and the personalisation evaluation.

For each graph (the SciFact corpus graph when it is built; synthetic power-law graphs of 100k nodes
/ 1M edges and 1M nodes / 10M edges) and a set of seed vectors shaped like first-stage results (20
seeds weighted 1 / (60 + rank)), it reports per-query latency and top-100 overlap with an exact
reference (power iteration to L1 1e-10) for:

- power iteration (L1 tolerance 1e-6),
- PowerWalk Monte Carlo fingerprints (``s F``, and with one exact refinement step),
- ``networkx.pagerank`` with ``personalization`` (default tolerance), only up to 100k nodes: at 1M
  nodes one call would take minutes (it converts the whole graph on every call).

plus the fingerprint build time and size. :func:`personalisation_eval` measures nDCG@10 with and
without a user history on SciFact (one relevant document given as history).
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from streamrank.index.ppr_solvers import (
    DEFAULT_ALPHA,
    build_fingerprints,
    fingerprint_ppr,
    power_iteration,
    transition_matrix,
)

SEEDS_PER_QUERY = 20
TOP = 100


def synthetic_graph(n: int, m: int, seed: int = 0) -> Any:
    """A random directed graph with power-law out-degrees (Pareto, >= 1) and power-law popularity.

    About ``m`` edges, no self loops, no dangling nodes; node labels are shuffled so that popular
    nodes are spread over the id range. Unit weights.
    """
    import scipy.sparse as sp

    rng = np.random.default_rng(seed)
    raw = rng.pareto(2.0, n) + 1.0
    out_degree = np.maximum(1, np.round(raw * (m / raw.sum()))).astype(np.int64)
    src = np.repeat(np.arange(n), out_degree)
    popularity = rng.permutation(n)
    dst = popularity[np.minimum((n * rng.random(len(src)) ** 2.5).astype(np.int64), n - 1)]
    loops = src == dst
    dst[loops] = (dst[loops] + 1) % n
    adj = sp.csr_matrix((np.ones(len(src), dtype=np.float32), (src, dst)), shape=(n, n))
    adj.data[:] = 1.0  # duplicate edges count once
    return adj


def seed_vectors(n: int, count: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` seed distributions (n x count): 20 random nodes weighted like RRF ranks 1..20."""
    weights = 1.0 / (60.0 + np.arange(1, SEEDS_PER_QUERY + 1))
    out = np.zeros((n, count))
    for j in range(count):
        out[rng.choice(n, size=min(SEEDS_PER_QUERY, n), replace=False), j] = weights[
            : min(SEEDS_PER_QUERY, n)
        ]
    return out / out.sum(axis=0)


def top_overlap(scores: np.ndarray, reference: np.ndarray, top: int = TOP) -> float:
    """|top-k(scores) & top-k(reference)| / k."""
    k = min(top, len(reference))
    a = np.argpartition(-scores, k - 1)[:k]
    b = np.argpartition(-reference, k - 1)[:k]
    return len(np.intersect1d(a, b)) / k


def _timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    started = time.perf_counter()
    value = fn()
    return value, (time.perf_counter() - started) * 1000.0


def bench_graph(
    name: str,
    adjacency: Any,
    *,
    queries: int,
    walks: int,
    max_length: int = 30,
    networkx_queries: int = 0,
    alpha: float = DEFAULT_ALPHA,
    seed: int = 0,
) -> dict[str, Any]:
    """Latency and top-100 overlap of every solver on one graph (see the module docstring)."""
    import scipy.sparse as sp

    n = adjacency.shape[0]
    P, dangling = transition_matrix(adjacency)
    PT = P.T.tocsr()
    seeds = seed_vectors(n, queries, np.random.default_rng(seed))
    exact, exact_ms = _timed(
        lambda: power_iteration(P, seeds, alpha=alpha, tol=1e-10, max_iter=1000, PT=PT, dangling=dangling)
    )
    fingerprints, build_ms = _timed(
        lambda: build_fingerprints(P, alpha=alpha, walks=walks, max_length=max_length, seed=seed)
    )
    size = fingerprints.data.nbytes + fingerprints.indices.nbytes + fingerprints.indptr.nbytes

    rows: dict[str, dict[str, Any]] = {}

    def measure(solver: str, run_one: Callable[[int], np.ndarray], count: int, note: str = "") -> None:
        latencies, overlaps = [], []
        for j in range(count):
            scores, ms = _timed(lambda j=j: run_one(j))
            latencies.append(ms)
            overlaps.append(top_overlap(scores, exact[:, j]))
        rows[solver] = {
            "queries": count,
            "median_ms": statistics.median(latencies),
            "mean_ms": statistics.fmean(latencies),
            "top100_overlap": statistics.fmean(overlaps),
            "note": note,
        }

    measure(
        "power iteration (tol 1e-6)",
        lambda j: power_iteration(P, seeds[:, j], alpha=alpha, PT=PT, dangling=dangling),
        queries,
    )
    for steps in (0, 1):
        measure(
            f"fingerprints (refine {steps})",
            lambda j, steps=steps: fingerprint_ppr(
                fingerprints, sp.csr_matrix(seeds[:, j][None, :]), P=P, alpha=alpha, refine_steps=steps
            ).toarray()[0],
            queries,
        )
    info: dict[str, Any] = {}
    if networkx_queries:
        import networkx as nx

        graph, nx_build_ms = _timed(lambda: nx.from_scipy_sparse_array(adjacency, create_using=nx.DiGraph))
        info["networkx_graph_build_ms"] = nx_build_ms

        def nx_one(j: int) -> np.ndarray:
            nz = np.flatnonzero(seeds[:, j])
            result = nx.pagerank(
                graph, alpha=1.0 - alpha, personalization=dict(zip(nz.tolist(), seeds[nz, j], strict=True))
            )
            out = np.zeros(n)
            out[list(result)] = list(result.values())
            return out

        measure("networkx pagerank", nx_one, networkx_queries, "default tol (1e-6 x n, L1)")
    else:
        rows["networkx pagerank"] = {"skipped": f"not run at {n:,} nodes: one call would take minutes"}
    fastest_fp = rows["fingerprints (refine 1)"]["median_ms"]
    if "median_ms" in rows["networkx pagerank"]:
        info["speedup_fingerprints_vs_networkx"] = rows["networkx pagerank"]["median_ms"] / fastest_fp
    info["speedup_fingerprints_vs_power"] = rows["power iteration (tol 1e-6)"]["median_ms"] / fastest_fp
    return {
        "graph": name,
        "nodes": n,
        "edges": int(adjacency.nnz),
        "alpha": alpha,
        "exact_reference_ms_per_query": exact_ms / queries,
        "fingerprints": {
            "walks_per_node": walks,
            "max_length": max_length,
            "build_s": build_ms / 1000.0,
            "nnz": int(fingerprints.nnz),
            "megabytes": size / 2**20,
        },
        "solvers": rows,
        **info,
    }


def scifact_graph() -> Any | None:
    """The adjacency of the SciFact corpus graph if ``streamrank index`` built it, else None."""
    from streamrank.config import default_index_dir
    from streamrank.index.graph import GRAPH_FILE, CorpusGraph

    folder = default_index_dir("scifact") / "graph"
    if not (folder / GRAPH_FILE).exists():
        return None
    return CorpusGraph.load(folder).adjacency()


def print_table(results: list[dict[str, Any]]) -> None:
    header = f"{'graph':<22}{'solver':<30}{'median ms':>11}{'top-100 overlap':>17}"
    print(header)
    print("-" * len(header))
    for res in results:
        label = f"{res['graph']}"
        for solver, row in res["solvers"].items():
            if "skipped" in row:
                print(f"{label:<22}{solver:<30}{'skipped':>11}   {row['skipped']}")
            else:
                print(f"{label:<22}{solver:<30}{row['median_ms']:>11.2f}{row['top100_overlap']:>17.3f}")
            label = ""
        fp = res["fingerprints"]
        extra = (
            f"  vs networkx {res['speedup_fingerprints_vs_networkx']:.0f}x"
            if "speedup_fingerprints_vs_networkx" in res
            else ""
        )
        print(
            f"{'':<22}fingerprints: {fp['walks_per_node']} walks/node, build {fp['build_s']:.1f} s, "
            f"{fp['megabytes']:.0f} MB; speed-up vs power {res['speedup_fingerprints_vs_power']:.0f}x{extra}"
        )
    print()


def run_ppr_benchmark(output_dir: Path | None = None, quick: bool = False) -> dict[str, Any]:
    """Every graph's solver table (printed) plus the personalisation evaluation when SciFact is indexed."""
    results = []
    adjacency = scifact_graph()
    if adjacency is not None:
        results.append(bench_graph("scifact-knn", adjacency, queries=50, walks=64, networkx_queries=5))
    sizes = (
        [(10_000, 100_000, 20, 3)] if quick else [(100_000, 1_000_000, 20, 3), (1_000_000, 10_000_000, 10, 0)]
    )
    for n, m, queries, nx_queries in sizes:
        graph = synthetic_graph(n, m)
        results.append(
            bench_graph(
                f"synthetic-{n // 1000}k", graph, queries=queries, walks=16, networkx_queries=nx_queries
            )
        )
        del graph
    print_table(results)
    figures: dict[str, Any] = {"graphs": results}
    if adjacency is None:
        figures["scifact"] = "SciFact graph not built (streamrank index --pipeline configs/ppr.toml)"
    elif not quick:
        figures["personalisation"] = personalisation_eval()
        print(json.dumps(figures["personalisation"], indent=2))
    if output_dir is not None:
        (Path(output_dir) / "ppr_table.json").write_text(json.dumps(results, indent=2) + "\n")
    return figures


def personalisation_eval(
    dataset: str = "scifact",
    pipeline: str | Path = "configs/ppr.toml",
    split: str = "test",
    *,
    index_dir: str | Path | None = None,
    limit: int | None = None,
) -> dict[str, Any]:
    """nDCG@10 with and without a user history, on the queries with at least two relevant documents.

    The history is one relevant document (the first by id); it is removed from both rankings and
    from the query's judgments, so only the remaining relevant documents count.
    """
    from streamrank.compose import load_pipeline
    from streamrank.datasets import load_dataset
    from streamrank.eval.metrics import evaluate_run
    from streamrank.types import Query, Ranking

    data = load_dataset(dataset)
    qrels = data.qrels(split)
    chosen = []
    for query in data.queries(split):
        relevant = sorted(d for d, g in qrels.get(query.id, {}).items() if g > 0)
        if len(relevant) >= 2:
            chosen.append((query, relevant[0]))
    chosen = chosen[: limit if limit else None]
    pipe = load_pipeline(pipeline, corpus=dataset, index_dir=index_dir)
    try:
        pipe.index()
        runs: dict[str, dict[str, dict[str, float]]] = {"without": {}, "with": {}}
        for query, held in chosen:
            personal = Query(id=query.id, text=query.text, user_history=(held,))
            for label, q in (("without", query), ("with", personal)):
                (ranking,) = pipe.run([Ranking(query=q)])
                runs[label][query.id] = {
                    c.doc_id: float(len(ranking.candidates) - i)
                    for i, c in enumerate(ranking.candidates)
                    if c.doc_id != held
                }
    finally:
        pipe.close()
    judged = {q.id: {d: g for d, g in qrels[q.id].items() if d != held} for q, held in chosen}
    result = {
        "dataset": dataset,
        "split": split,
        "pipeline": str(pipeline),
        "queries": len(chosen),
        "history": "one relevant document per query (first by id), removed from ranking and qrels",
    }
    for label, run in runs.items():
        result[f"nDCG@10 {label} history"] = evaluate_run(run, judged, ["nDCG@10"])["nDCG@10"]
    return result
