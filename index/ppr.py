"""Personalized PageRank over the corpus graph: two solvers and the ``ppr`` pipeline stage.

Solvers (pure functions over a row-stochastic scipy matrix ``P``; restart probability ``alpha``):

- :func:`power_iteration`: exact, ``x <- alpha s + (1 - alpha) (x P + (x . dangling) s)``, for a
  batch of seed vectors at once (networkx's convention: a dangling node's mass goes back to the seeds).
- :func:`build_fingerprints` + :func:`fingerprint_ppr`: PowerWalk (Liu et al., 2016). Offline, ``walks``
  random walks with restart from every vertex, simulated for all walkers at once; row ``v`` of the
  sparse fingerprint matrix ``F`` holds ``alpha / walks`` times the visit counts, an unbiased estimate of
  the PPR vector of ``v``. Online, PPR is linear in the seeds, so ``ppr(s) ~ s F``; ``refine_steps``
  exact propagation steps first (PowerWalk's online iteration) shrink the Monte Carlo error by
  ``(1 - alpha) ** refine_steps``. A walk at a dangling node restarts at its own source, so ``s F``
  equals networkx's answer exactly only on graphs without dangling nodes (the symmetrised kNN graph
  has none). Fingerprints are stored beside the graph, one file per walk setting, and on ``add`` /
  ``delete`` only the rows whose walks touched a changed node are re-walked.

The graph links each document to its ``neighbors`` nearest documents by the dense stage's embeddings
and, with ``lexical_neighbors`` > 0, to its top BM25 hits when its own text (first
``LEXICAL_QUERY_TERMS`` terms) is the query, as in GAR's corpus graph (MacAvaney et al., 2022),
searched in the pipeline's BM25 index (``bm25_index``) at build time and for every added document.

The stage seeds PPR with the incoming first-stage ranking (top ``seeds`` candidates, weighted by
``1 / (rrf_k + rank)`` or by min-max score) mixed with the query's ``user_history`` documents
(``history_weight`` of the mass), adds the best-scoring graph neighbours to the candidate pool
(``expand``) and fuses PPR with the incoming ranking (``fusion``, ``weight``; requests with a history
may use their own ``history_fusion_weight``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np
from pydantic import Field

from streamrank.errors import ConfigError
from streamrank.index.base import IndexedConfig, IndexedRetriever
from streamrank.models import MINILM
from streamrank.types import Candidate, Document, Query, Ranking

if TYPE_CHECKING:
    import scipy.sparse as sp

    from streamrank.index.bm25 import BM25Retriever
    from streamrank.index.dense import DenseRetriever
    from streamrank.index.graph import CorpusGraph

log = logging.getLogger(__name__)

DEFAULT_ALPHA = 0.15
"""Restart probability (damping 0.85), the published PageRank setting."""

LEXICAL_QUERY_TERMS = 300
"""A document used as a BM25 query is cut to its first this many terms (Lucene caps boolean clauses)."""


# ---------------------------------------------------------------------------------------------
# Solvers
# ---------------------------------------------------------------------------------------------
def transition_matrix(adjacency: sp.spmatrix | sp.sparray) -> tuple[sp.csr_matrix, np.ndarray]:
    """Row-normalise a non-negative weighted adjacency into ``P`` (float64 CSR) and the dangling mask."""
    import scipy.sparse as sp

    adj = sp.csr_matrix(adjacency, dtype=np.float64)
    out = np.asarray(adj.sum(axis=1)).ravel()
    dangling = out <= 0
    inv = np.divide(1.0, out, out=np.zeros_like(out), where=~dangling)
    return sp.csr_matrix(sp.diags(inv) @ adj), dangling


def power_iteration(
    P: sp.csr_matrix,
    seeds: np.ndarray,
    *,
    alpha: float = DEFAULT_ALPHA,
    tol: float = 1e-6,
    max_iter: int = 100,
    dangling: np.ndarray | None = None,
    PT: sp.csr_matrix | None = None,
) -> np.ndarray:
    """Exact PPR for one seed vector (shape n) or a batch (shape n x b); columns are normalised to sum 1.

    Stops when every column moved less than ``tol`` in L1 norm. ``PT`` (``P.T`` as CSR) may be passed
    to avoid transposing on every call.
    """
    s = np.asarray(seeds, dtype=np.float64)
    squeeze = s.ndim == 1
    s = s.reshape(len(s), -1)
    total = s.sum(axis=0)
    if np.any(total <= 0):
        raise ValueError("every seed vector needs positive mass")
    s = s / total
    PT = P.T.tocsr() if PT is None else PT
    if dangling is None:
        dangling = np.asarray(P.sum(axis=1)).ravel() <= 0
    dmask = dangling.astype(np.float64)
    x = s.copy()
    for _ in range(max_iter):
        nxt = alpha * s + (1.0 - alpha) * (PT @ x + s * (dmask @ x))
        err = np.abs(nxt - x).sum(axis=0).max()
        x = nxt
        if err < tol:
            break
    return x[:, 0] if squeeze else x


def _sample_next(
    P: sp.csr_matrix, pos: np.ndarray, u: np.ndarray, cumulative: np.ndarray | None
) -> np.ndarray:
    """One weighted step for every walker (vectorised): column of the sampled out-edge of ``pos``."""
    start = P.indptr[pos]
    deg = P.indptr[pos + 1] - start
    if cumulative is None:  # uniform weights within every row
        idx = start + np.minimum((u * deg).astype(np.int64), deg - 1)
    else:
        base = np.where(start > 0, cumulative[np.maximum(start - 1, 0)], 0.0)
        idx = np.searchsorted(cumulative, base + u * (cumulative[P.indptr[pos + 1] - 1] - base), side="right")
        idx = np.clip(idx, start, start + deg - 1)
    return P.indices[idx]


def build_fingerprints(
    P: sp.csr_matrix,
    *,
    alpha: float = DEFAULT_ALPHA,
    walks: int = 64,
    max_length: int = 30,
    seed: int = 0,
    sources: np.ndarray | None = None,
    chunk_walkers: int = 2_000_000,
) -> sp.csr_matrix:
    """Monte Carlo PPR fingerprints: row i estimates the PPR vector of ``sources[i]`` (default: all nodes).

    Each walk starts at its source, stops with probability ``alpha`` before every step (at most
    ``max_length`` steps) and restarts at its source from a dangling node. Every visit adds
    ``alpha / walks``. All walkers of a chunk of sources move together, one numpy step at a time.
    """
    import scipy.sparse as sp

    n = P.shape[0]
    P = sp.csr_matrix(P)
    sources = np.arange(n, dtype=np.int64) if sources is None else np.asarray(sources, dtype=np.int64)
    deg = np.diff(P.indptr)
    dangling = deg == 0
    row_of_edge = np.repeat(np.arange(n), deg)
    uniform = bool(np.allclose(P.data, 1.0 / deg[row_of_edge])) if P.nnz else True
    cumulative = None if uniform else np.cumsum(P.data, dtype=np.float64)
    rng = np.random.default_rng(seed)
    per_chunk = max(1, chunk_walkers // max(walks, 1))
    blocks = []
    for lo in range(0, len(sources), per_chunk):
        local = np.repeat(np.arange(min(per_chunk, len(sources) - lo), dtype=np.int64), walks)
        origin = sources[lo:][local]
        pos = origin.copy()
        rows, cols = [local], [pos]
        for _ in range(max_length):
            keep = rng.random(len(pos)) >= alpha
            local, origin, pos = local[keep], origin[keep], pos[keep]
            if len(pos) == 0:
                break
            at_dangling = dangling[pos]
            if at_dangling.any():
                pos = np.where(at_dangling, origin, pos)
                # a restart consumes this step; walkers that restarted move on from their source next step
                moving = ~at_dangling
                stepped = pos.copy()
                stepped[moving] = _sample_next(P, pos[moving], rng.random(int(moving.sum())), cumulative)
                pos = stepped
            else:
                pos = _sample_next(P, pos, rng.random(len(pos)), cumulative)
            rows.append(local)
            cols.append(pos)
        r = np.concatenate(rows)
        c = np.concatenate(cols)
        block = sp.csr_matrix(
            (np.full(len(r), alpha / walks, dtype=np.float32), (r, c)),
            shape=(min(per_chunk, len(sources) - lo), n),
        )
        block.sum_duplicates()
        blocks.append(block)
    if not blocks:
        return sp.csr_matrix((0, n), dtype=np.float32)
    return sp.csr_matrix(sp.vstack(blocks, format="csr"), dtype=np.float32)


def fingerprint_ppr(
    F: sp.csr_matrix,
    seeds: sp.csr_matrix,
    *,
    P: sp.csr_matrix | None = None,
    alpha: float = DEFAULT_ALPHA,
    refine_steps: int = 0,
) -> sp.csr_matrix:
    """Approximate PPR for a batch of sparse seed rows (b x n, rows summing to 1): ``s F``.

    With ``refine_steps = T`` > 0 (needs ``P``) the first T terms of the PPR series are exact:
    ``sum_{t<T} alpha (1-alpha)^t s P^t + (1-alpha)^T (s P^T) F``.
    """
    x = seeds.tocsr().astype(np.float64)
    acc = None
    for _ in range(refine_steps):
        if P is None:
            raise ValueError("refine_steps > 0 needs the transition matrix P")
        term = alpha * x
        acc = term if acc is None else acc + term
        x = (1.0 - alpha) * (x @ P)
    result = x.astype(F.dtype) @ F  # never upcast F itself: it can hold 10^8 entries
    return (result if acc is None else result + acc).tocsr()


def replace_rows(F: sp.csr_matrix, rows: np.ndarray, block: sp.csr_matrix) -> sp.csr_matrix:
    """``F`` with ``rows`` replaced by the rows of ``block`` (same order)."""
    import scipy.sparse as sp

    keep = np.ones(F.shape[0], dtype=F.dtype)
    keep[rows] = 0
    coo = block.tocoo()
    placed = sp.csr_matrix((coo.data, (np.asarray(rows)[coo.row], coo.col)), shape=F.shape, dtype=F.dtype)
    out = sp.csr_matrix(sp.diags(keep) @ F + placed)
    out.eliminate_zeros()
    return out


# ---------------------------------------------------------------------------------------------
# Fusion of PPR with the incoming ranking
# ---------------------------------------------------------------------------------------------
def _minmax(values: np.ndarray) -> np.ndarray:
    """Min-max normalise the finite values to [0, 1]; NaN (missing) becomes 0; constant lists give 1."""
    out = np.zeros(len(values))
    finite = ~np.isnan(values)
    if finite.any():
        low, high = values[finite].min(), values[finite].max()
        out[finite] = (values[finite] - low) / (high - low) if high > low else 1.0
    return out


def fuse_with_ppr(
    incoming_rank: np.ndarray,
    incoming_score: np.ndarray,
    ppr: np.ndarray,
    *,
    method: str,
    weight: float,
    rrf_k: int = 60,
) -> np.ndarray:
    """Final score per pool candidate (NaN incoming rank/score = a candidate PPR added).

    ``rrf``: ``(1-w) / (rrf_k + incoming rank) + w / (rrf_k + PPR rank)`` (a missing rank adds 0; PPR
    ranks only count candidates with positive PPR); ``interpolate``: ``(1-w) minmax(incoming) + w
    minmax(PPR)``; ``ppr_only``: PPR.
    """
    if method == "ppr_only":
        return ppr.astype(np.float64)
    if method == "interpolate":
        return (1.0 - weight) * _minmax(incoming_score) + weight * _minmax(ppr.astype(np.float64))
    if method == "rrf":
        order = np.argsort(-ppr, kind="stable")
        ppr_rank = np.empty(len(ppr))
        ppr_rank[order] = np.arange(1, len(ppr) + 1)
        first = np.where(np.isnan(incoming_rank), 0.0, 1.0 / (rrf_k + np.nan_to_num(incoming_rank)))
        second = np.where(ppr > 0, 1.0 / (rrf_k + ppr_rank), 0.0)
        return (1.0 - weight) * first + weight * second
    raise ValueError(f"unknown fusion {method!r}")


# ---------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------
class PPRConfig(IndexedConfig):
    index: str | None = "graph"
    """Sub-folder of the index_dir holding the graph (and fingerprints)."""
    k: int = Field(100, ge=1)
    # graph (index-time: a change needs a rebuild)
    dense_model: str = MINILM
    """The dense stage whose stored embeddings the kNN graph links (its ``model``)."""
    neighbors: int = Field(10, ge=1)
    min_similarity: float = 0.0
    """Edges with cosine at or below this are dropped."""
    edges: str | None = None
    """Optional edge list file (``src dst [weight]`` per line) added on top of the kNN edges."""
    edge_weight: float = Field(1.0, ge=0)
    lexical_neighbors: int = Field(0, ge=0)
    """BM25 neighbours per document (GAR's lexical corpus graph; 16 in the paper); 0: none."""
    bm25_index: str = "bm25"
    """The BM25 index (its stage's ``index`` folder) the lexical neighbours are searched in."""
    lexical_weight: float = Field(0.5, ge=0)
    """Weight of the lexical edges (BM25 score / the document's best score) beside the kNN cosines."""
    # solver
    alpha: float = Field(DEFAULT_ALPHA, gt=0, lt=1)
    solver: Literal["power", "montecarlo"] = "power"
    tol: float = Field(1e-6, gt=0)
    max_iter: int = Field(100, ge=1)
    walks: int = Field(64, ge=1)
    """Monte Carlo: walks per node for the fingerprints."""
    max_length: int = Field(30, ge=1)
    refine_steps: int = Field(1, ge=0)
    """Monte Carlo: exact propagation steps before the fingerprints (PowerWalk's online iteration)."""
    walk_seed: int = 0
    # seeding and fusion
    seeds: int = Field(20, ge=1)
    """How many of the incoming top candidates seed PPR."""
    seed_weighting: Literal["rank", "score"] = "rank"
    """``rank``: 1 / (rrf_k + rank); ``score``: incoming scores min-max normalised (+ 1 / seeds)."""
    history_weight: float = Field(0.5, ge=0, le=1)
    """Share of the seed mass on the query's ``user_history`` documents (when it has both)."""
    expand: int = Field(20, ge=0)
    """Graph neighbours (best PPR outside the pool) added to the candidate pool."""
    fusion: Literal["rrf", "interpolate", "ppr_only"] = "rrf"
    weight: float = Field(0.5, ge=0, le=1)
    """Weight of PPR in the fusion (the incoming score gets 1 - weight)."""
    history_fusion_weight: float | None = Field(None, ge=0, le=1)
    """``weight`` for requests that carry a user history (default: ``weight``)."""
    rrf_k: int = Field(60, ge=0)


@dataclass
class _Solved:
    """The open graph and what the solvers need from it."""

    graph: CorpusGraph
    P: sp.csr_matrix
    PT: sp.csr_matrix
    dangling: np.ndarray
    fingerprints: sp.csr_matrix | None = None


class PPRStage(IndexedRetriever):
    """Personalized PageRank over the corpus kNN graph (kind ``ppr``), see the module docstring.

    ``stage_scores[name]`` of every output candidate is its PPR score (0 outside the graph);
    ``stage_scores[name + "_fused"]`` and ``score`` are the fused score. Candidates PPR adds have no
    document (the pipeline attaches text).
    """

    Config = PPRConfig
    config: PPRConfig
    is_retriever: ClassVar[bool] = False
    libraries = ("faiss-cpu", "scipy", "numpy")

    def __init__(self, config: PPRConfig, context: Any) -> None:
        super().__init__(config, context)
        self._solved: _Solved | None = None

    # ---- the dense index the graph is built from ---------------------------------------------
    def dense(self) -> DenseRetriever:
        """The pipeline's dense stage for ``dense_model`` (one is made if the pipeline has none)."""
        model = self.config.dense_model
        return self.context.shared(
            ("dense-embeddings", model),
            lambda: self.context.build_stage({"kind": "dense", "model": model}, f"ppr stage {self.name!r}"),
        )

    def dependencies(self) -> tuple[DenseRetriever]:
        """The dense stage: built and updated before the graph that links its embeddings."""
        return (self.dense(),)

    def bm25(self) -> BM25Retriever:
        """A BM25 stage over the pipeline's ``bm25_index`` (for the lexical neighbours)."""
        name, depth = self.config.bm25_index, self.config.lexical_neighbors + 1  # + the document itself
        return self.context.shared(
            ("bm25-index", name, depth),
            lambda: self.context.build_stage(
                {"kind": "bm25", "index": name, "k": depth}, f"ppr stage {self.name!r}"
            ),
        )

    def settings(self) -> dict[str, Any]:
        dense = self.dense()
        settings = {
            "kind": "knn-graph",
            "neighbors": self.config.neighbors,
            "min_similarity": self.config.min_similarity,
            "dense_index": dense.folder.name,
            "dense_model": dense.settings()["model"],
        }
        if self.config.lexical_neighbors:  # absent otherwise: graphs built before the option still match
            bm25 = self.bm25().config
            settings["lexical"] = {
                "neighbors": self.config.lexical_neighbors,
                "bm25_index": self.config.bm25_index,
                "k1": bm25.k1,
                "b": bm25.b,
                "query_terms": LEXICAL_QUERY_TERMS,
            }
        return settings

    def lexical_edges(self, documents: Sequence[Document], batch: int = 1000) -> list[tuple[str, str, float]]:
        """``(doc, neighbour, weight)`` for each document's top ``lexical_neighbors`` BM25 hits (itself
        excluded) with its text as the query; weight = score / the document's best score."""
        from streamrank.index import manifest as mf

        k = self.config.lexical_neighbors
        if not k:
            return []
        bm25 = self.bm25()
        if mf.read_manifest(bm25.folder) is None:
            raise ConfigError(
                f"ppr stage {self.name!r}: lexical_neighbors = {k} needs the pipeline's BM25 index "
                f"{self.config.bm25_index!r} ({bm25.folder} is not built): add a bm25 stage before this "
                "one, or set bm25_index to its index folder"
            )
        queries = [
            Ranking(query=Query(id=d.id, text=" ".join(d.contents.split()[:LEXICAL_QUERY_TERMS])))
            for d in documents
            if d.contents.strip()
        ]
        edges = []
        for lo in range(0, len(queries), batch):
            for ranking in bm25.run_top(queries[lo : lo + batch], k + 1):
                hits = [c for c in ranking.candidates if c.doc_id != ranking.query.id][:k]
                best = max((c.score for c in hits), default=0.0)
                edges += [(ranking.query.id, c.doc_id, c.score / best) for c in hits if c.score > 0]
        return edges

    def _user_edges(self) -> list[tuple[str, str, float]]:
        from streamrank.index.graph import read_edge_list

        return read_edge_list(self.config.edges) if self.config.edges else []

    # ---- index files -----------------------------------------------------------------------------
    def _write(self, folder: Path, documents: list[Document]) -> dict[str, Any]:
        from streamrank.index.graph import CorpusGraph

        started = time.perf_counter()
        ids = [d.id for d in documents]
        graph = CorpusGraph.from_embeddings(
            ids,
            self.dense().embeddings_for(ids),
            neighbors=self.config.neighbors,
            min_similarity=self.config.min_similarity,
        )
        graph.link_lexical(self.lexical_edges(documents))
        graph.save(folder)
        info = {**self._graph_counts(graph), "build_seconds": round(time.perf_counter() - started, 2)}
        if self.config.solver == "montecarlo":  # precomputed offline, with the index
            graph.user_edges = self._user_edges()
            solved = self._solve_state(graph)
            self._fingerprints(solved, folder)
            info["fingerprint_seconds"] = round(time.perf_counter() - started - info["build_seconds"], 2)
        return info

    def _open(self, folder: Path, manifest: dict[str, Any]) -> None:
        from streamrank.index.graph import CorpusGraph

        self._solved = self._solve_state(CorpusGraph.load(folder, self._user_edges()))

    def _release(self) -> None:
        self._solved = None

    def _live_ids(self) -> list[str]:
        return list(self._solved.graph.ids) if self._solved else []

    def _solve_state(self, graph: CorpusGraph, fingerprints: sp.csr_matrix | None = None) -> _Solved:
        lexical_weight = self.config.lexical_weight if self.config.lexical_neighbors else 0.0
        P, dangling = transition_matrix(graph.adjacency(self.config.edge_weight, lexical_weight))
        return _Solved(graph, P, P.T.tocsr(), dangling, fingerprints)

    # ---- fingerprints ------------------------------------------------------------------------------
    def _fingerprint_file(self, folder: Path) -> Path:
        """One file per walk setting (so configurations can share a graph)."""
        from streamrank.index.graph import file_digest

        cfg = self.config
        key = {
            "alpha": cfg.alpha,
            "walks": cfg.walks,
            "max_length": cfg.max_length,
            "seed": cfg.walk_seed,
            "edges": file_digest(cfg.edges) if cfg.edges else None,
            "edge_weight": cfg.edge_weight,
        }
        if cfg.lexical_neighbors:  # keeps the file names of graphs without lexical edges
            key["lexical_weight"] = cfg.lexical_weight
        digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
        return folder / f"fingerprints-{digest}.npz"

    def _compute_fingerprints(
        self, P: sp.csr_matrix, sources: np.ndarray | None = None, salt: int = 0
    ) -> sp.csr_matrix:
        cfg = self.config
        return build_fingerprints(
            P,
            alpha=cfg.alpha,
            walks=cfg.walks,
            max_length=cfg.max_length,
            seed=cfg.walk_seed + salt,
            sources=sources,
        )

    def _fingerprints(self, solved: _Solved, folder: Path | None = None) -> sp.csr_matrix:
        """The fingerprints of the open graph: loaded, or computed and saved when missing or stale."""
        from streamrank.index.graph import load_sparse, save_sparse

        if solved.fingerprints is not None:
            return solved.fingerprints
        path = self._fingerprint_file(folder or self.folder)
        if path.exists():
            F, meta, _ = load_sparse(path)
            if meta.get("graph_version") == solved.graph.version:
                solved.fingerprints = F
                return F
        log.info(
            "ppr stage %r: computing fingerprints for %d nodes (%s)", self.name, len(solved.graph), path.name
        )
        solved.fingerprints = self._compute_fingerprints(solved.P)
        save_sparse(path, solved.fingerprints, {"graph_version": solved.graph.version})
        return solved.fingerprints

    def _refresh_fingerprints(
        self, old: _Solved, new: _Solved, changed: np.ndarray, kept: np.ndarray | None
    ) -> None:
        """Carry fingerprints over an update: rows whose walks touched a changed node are re-walked.

        ``kept`` maps new rows to old rows after a delete (None after an add: old rows keep their number).
        """
        from streamrank.index.graph import save_sparse

        if self.config.solver != "montecarlo":
            return  # a fingerprint file left by another setting is stale now; it is redone when loaded
        F = self._fingerprints(old)
        n = len(new.graph)
        if kept is not None:
            F = F[kept][:, kept].tocsr()
        else:
            F = F.copy()
            F.resize((n, n))
        touched = np.zeros(n, dtype=bool)
        touched[changed] = True
        touched |= np.diff(F.indptr) == 0  # new nodes (every fingerprint row holds at least its source)
        touched[np.unique(F[:, changed].tocoo().row)] = True
        rows = np.flatnonzero(touched)
        if len(rows) > n // 4:
            F = self._compute_fingerprints(new.P)
        elif len(rows):
            salt = int(new.graph.version[:8], 16)  # fresh randomness for re-walked rows
            F = replace_rows(F, rows, self._compute_fingerprints(new.P, sources=rows, salt=salt))
        new.fingerprints = F
        save_sparse(self._fingerprint_file(self.folder), F, {"graph_version": new.graph.version})

    # ---- updates --------------------------------------------------------------------------------
    def _add(self, documents: Sequence[Document]) -> dict[str, Any]:
        old = self._solved
        assert old is not None
        graph = old.graph
        ids = [d.id for d in documents]
        new_ids = [i for i in dict.fromkeys(ids) if i not in graph.row_of]
        everything = graph.ids + new_ids
        base = self.dense().embeddings_for(everything)
        position = {doc_id: i for i, doc_id in enumerate(everything)}
        graph = _copy_graph(graph)
        changed = graph.add(ids, base[[position[i] for i in ids]], base, self.lexical_edges(documents))
        return self._commit(old, graph, changed, kept=None)

    def _delete(self, doc_ids: Sequence[str]) -> dict[str, Any]:
        old = self._solved
        assert old is not None
        graph = _copy_graph(old.graph)
        gone = {d for d in doc_ids if d in graph.row_of}
        kept = np.array([i for i, d in enumerate(graph.ids) if d not in gone], dtype=np.int64)
        changed = graph.delete(gone)
        return self._commit(old, graph, changed, kept=kept)

    def _commit(
        self, old: _Solved, graph: CorpusGraph, changed: np.ndarray, kept: np.ndarray | None
    ) -> dict[str, Any]:
        new = self._solve_state(graph)
        self._refresh_fingerprints(old, new, changed, kept)
        graph.save(self.folder)
        self._solved = new
        return {**(self._manifest or {}).get("info", {}), **self._graph_counts(graph)}

    def _graph_counts(self, graph: CorpusGraph) -> dict[str, int]:
        """The graph's size for the index manifest (lexical edges only when the option is on)."""
        counts = {"doc_count": len(graph), "edges": int(graph.knn.nnz)}
        if self.config.lexical_neighbors:
            counts["lexical_edges"] = int(graph.lexical.nnz)
        return counts

    # ---- ranking ----------------------------------------------------------------------------------
    def seed_vector(self, ranking: Ranking, row_of: dict[str, int]) -> dict[int, float]:
        """Seed distribution (graph row -> mass) from the incoming top candidates and the user history."""
        cfg = self.config
        top = [(i, c) for i, c in enumerate(ranking.candidates[: cfg.seeds]) if c.doc_id in row_of]
        query: dict[int, float] = {}
        if top:
            if cfg.seed_weighting == "rank":
                weights = np.array([1.0 / (cfg.rrf_k + i + 1) for i, _ in top])
            else:
                weights = _minmax(np.array([c.score for _, c in top], dtype=np.float64)) + 1.0 / cfg.seeds
            for (_, c), w in zip(top, weights / weights.sum(), strict=True):
                query[row_of[c.doc_id]] = query.get(row_of[c.doc_id], 0.0) + float(w)
        history = [row_of[d] for d in dict.fromkeys(ranking.query.user_history) if d in row_of]
        if not history:
            return query
        share = cfg.history_weight if query else 1.0
        seeds = {row: (1.0 - share) * w for row, w in query.items()}
        for row in history:
            seeds[row] = seeds.get(row, 0.0) + share / len(history)
        return seeds

    def _ppr_vectors(self, solved: _Solved, seeds: list[dict[int, float]]) -> np.ndarray:
        """PPR (b x n, dense) for non-empty seed dicts, by the configured solver."""
        import scipy.sparse as sp

        cfg = self.config
        n = len(solved.graph)
        rows = np.repeat(np.arange(len(seeds)), [len(s) for s in seeds])
        cols = np.array([r for s in seeds for r in s], dtype=np.int64)
        vals = np.array([w for s in seeds for w in s.values()], dtype=np.float64)
        S = sp.csr_matrix((vals, (rows, cols)), shape=(len(seeds), n))
        if cfg.solver == "power":
            X = power_iteration(
                solved.P,
                S.toarray().T,
                alpha=cfg.alpha,
                tol=cfg.tol,
                max_iter=cfg.max_iter,
                dangling=solved.dangling,
                PT=solved.PT,
            )
            return X.T
        F = self._fingerprints(solved)
        return fingerprint_ppr(F, S, P=solved.P, alpha=cfg.alpha, refine_steps=cfg.refine_steps).toarray()

    def run(self, rankings: Sequence[Ranking]) -> list[Ranking]:
        """Seed, solve (one batch), expand the pool with the best new graph nodes, fuse; see the class doc."""
        self._ensure_open()
        with self.lock:
            solved = self._solved
            assert solved is not None
            seeds = [self.seed_vector(r, solved.graph.row_of) for r in rankings]
            active = [i for i, s in enumerate(seeds) if s]
            ppr = self._ppr_vectors(solved, [seeds[i] for i in active]) if active else None
            ids, row_of = solved.graph.ids, solved.graph.row_of
        out = list(rankings)
        for j, i in enumerate(active):
            out[i] = self._rerank(rankings[i], ppr[j], ids, row_of)
        for i, s in enumerate(seeds):
            if not s and rankings[i].candidates:
                out[i] = rankings[i].rescored(
                    self.name, [0.0] * len(rankings[i].candidates), keep=self.config.k
                )
                out[i].notes.append(f"{self.name}: no seed document is in the corpus graph; order kept")
        return out

    def run_top(self, rankings: Sequence[Ranking], k: int) -> list[Ranking]:
        """PPR reranks the pool it is given: the same work whatever the request's ``k``."""
        return self.run(rankings)

    def _rerank(self, ranking: Ranking, x: np.ndarray, ids: list[str], row_of: dict[str, int]) -> Ranking:
        cfg = self.config
        pool = list(ranking.candidates)
        in_pool = {c.doc_id for c in pool}
        if cfg.expand:
            depth = min(len(x), cfg.expand + len(pool))
            best = np.argpartition(-x, depth - 1)[:depth]
            best = best[np.argsort(-x[best], kind="stable")]
            added = [int(r) for r in best if x[r] > 0 and ids[r] not in in_pool][: cfg.expand]
            pool += [Candidate(doc_id=ids[r], score=0.0) for r in added]
        ppr = np.array([x[row_of[c.doc_id]] if c.doc_id in row_of else 0.0 for c in pool])
        n_in = len(ranking.candidates)
        incoming_rank = np.full(len(pool), np.nan)
        incoming_rank[:n_in] = np.arange(1, n_in + 1)
        incoming_score = np.full(len(pool), np.nan)
        incoming_score[:n_in] = [c.score for c in ranking.candidates]
        weight = cfg.weight
        if ranking.query.user_history and cfg.history_fusion_weight is not None:
            weight = cfg.history_fusion_weight
        fused = fuse_with_ppr(
            incoming_rank, incoming_score, ppr, method=cfg.fusion, weight=weight, rrf_k=cfg.rrf_k
        )
        result = ranking.rescored(self.name, fused, keep=cfg.k, candidates=pool)
        raw = dict(zip((c.doc_id for c in pool), ppr.tolist(), strict=True))
        for cand in result.candidates:
            cand.stage_scores[f"{self.name}_fused"] = cand.score
            cand.stage_scores[self.name] = raw[cand.doc_id]
        return result


def _copy_graph(graph: CorpusGraph) -> CorpusGraph:
    """A copy an update may change while queries keep using the original."""
    from dataclasses import replace

    return replace(
        graph,
        ids=list(graph.ids),
        knn=graph.knn.copy(),
        user_edges=list(graph.user_edges),
        lexical=graph.lexical.copy(),
    )
