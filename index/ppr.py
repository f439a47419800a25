"""The ``ppr`` pipeline stage: Personalized PageRank over the corpus graph.

PPR is solved by exact power iteration (``solver = "power"``) or from PowerWalk Monte Carlo
fingerprints (``solver = "montecarlo"``), the pure functions of :mod:`streamrank.index.ppr_solvers`.
Fingerprints are stored beside the graph, one file per walk setting, and on ``add`` / ``delete``
only the rows whose walks touched a changed node are re-walked.

The graph links each document to its ``neighbors`` nearest documents by the dense stage's embeddings
and, with ``lexical_neighbors`` > 0, to its top BM25 hits when its own text (first
``LEXICAL_QUERY_TERMS`` terms) is the query, as in GAR's corpus graph (MacAvaney et al., 2022),
searched in the BM25 stage named by ``lexical_from`` at build time and for every added document.
Both are stages the pipeline file declares, named here (``vectors_from = "dense"``) and bound when the
pipeline is loaded; PPR builds no stage of its own.

The stage seeds PPR with the incoming first-stage ranking (top ``seeds`` candidates, weighted by
``1 / (rrf_k + rank)`` or by min-max score) mixed with the query's ``user_history`` documents
(``history_weight`` of the mass), adds the best-scoring graph neighbours to the candidate pool
(``expand``) and fuses PPR with the incoming ranking (``fusion``, ``weight``; requests with a history
may use their own ``history_fusion_weight``; :func:`streamrank.index.scores.fuse_with_ppr`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import Field, model_validator

from streamrank.errors import ConfigError
from streamrank.index.base import IndexedConfig, IndexedStage
from streamrank.index.ppr_fingerprints import WalkSettings, load_fingerprints, save_fingerprints
from streamrank.index.ppr_solvers import (
    DEFAULT_ALPHA,
    fingerprint_ppr,
    power_iteration,
    seed_matrix,
    transition_matrix,
)
from streamrank.index.scores import fuse_with_ppr, minmax
from streamrank.stage import require_vector_source
from streamrank.types import Candidate, Document, Query, Ranking

if TYPE_CHECKING:
    import scipy.sparse as sp

    from streamrank.index.bm25 import BM25Retriever
    from streamrank.index.dense import DenseRetriever
    from streamrank.index.graph import CorpusGraph

log = logging.getLogger(__name__)

LEXICAL_QUERY_TERMS = 300
"""A document used as a BM25 query is cut to its first this many terms (Lucene caps boolean clauses)."""


class PPRConfig(IndexedConfig):
    index: str | None = "graph"
    """Sub-folder of the index_dir holding the graph (and fingerprints)."""
    k: int = Field(100, ge=1)
    # graph (index-time: a change needs a rebuild)
    vectors_from: str = "dense"
    """Name of the pipeline's dense stage whose stored embeddings the kNN graph links."""
    neighbors: int = Field(10, ge=1)
    min_similarity: float = 0.0
    """Edges with cosine at or below this are dropped."""
    edges: str | None = None
    """Optional edge list file (``src dst [weight]`` per line) added on top of the kNN edges."""
    edge_weight: float = Field(1.0, ge=0)
    lexical_neighbors: int = Field(0, ge=0)
    """BM25 neighbours per document (GAR's lexical corpus graph; 16 in the paper); 0: none."""
    lexical_from: str = "bm25"
    """Name of the pipeline's BM25 stage the lexical neighbours are searched in (with ``lexical_neighbors``)."""
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

    @model_validator(mode="before")
    @classmethod
    def _renamed_keys(cls, data: Any) -> Any:
        renamed = {"dense_model": "vectors_from", "bm25_index": "lexical_from"}
        for old, new in renamed.items():
            if isinstance(data, dict) and old in data:
                raise ValueError(f"`{old}` was replaced by `{new}`: the name of the pipeline's stage to read from")
        return data


@dataclass
class _Solved:
    """The open graph and what the solvers need from it."""

    graph: CorpusGraph
    P: sp.csr_matrix
    PT: sp.csr_matrix
    dangling: np.ndarray
    fingerprints: sp.csr_matrix | None = None


class PPRStage(IndexedStage):
    """Personalized PageRank over the corpus kNN graph (kind ``ppr``), see the module docstring.

    ``stage_scores[name]`` of every output candidate is its PPR score (0 outside the graph);
    ``stage_scores[name + "_fused"]`` and ``score`` are the fused score. Candidates PPR adds have no
    document (the pipeline attaches text).
    """

    Config = PPRConfig
    config: PPRConfig
    libraries = ("faiss-cpu", "scipy", "numpy")

    def __init__(self, config: PPRConfig, context: Any) -> None:
        super().__init__(config, context)
        self._solved: _Solved | None = None
        self._bound: dict[str, Any] = {}

    # ---- the stages the graph is built from (bound by name when the pipeline is loaded) -------
    def references(self) -> dict[str, str]:
        refs = {"vectors_from": self.config.vectors_from}
        if self.config.lexical_neighbors:
            refs["lexical_from"] = self.config.lexical_from
        return refs

    def bind(self, key: str, stage: Any) -> None:
        from streamrank.index.bm25 import BM25Retriever

        if key == "vectors_from":
            stage = require_vector_source(self, key, stage, {})
        elif not isinstance(stage, BM25Retriever):
            raise ConfigError(
                f"stage {self.name!r}: {key} = {stage.name!r} names a {type(stage).__name__}; the lexical "
                "neighbours are searched in an unsharded bm25 stage"
            )
        self._bound[key] = stage

    def _stage(self, key: str) -> Any:
        stage = self._bound.get(key)
        if stage is None:
            raise ConfigError(
                f"ppr stage {self.name!r}: {key} = {getattr(self.config, key)!r} is not bound (load the stage "
                "through a pipeline file, which binds stage references)"
            )
        return stage

    def dense(self) -> DenseRetriever:
        """The dense stage ``vectors_from`` names."""
        return self._stage("vectors_from")

    def bm25(self) -> BM25Retriever:
        """The BM25 stage ``lexical_from`` names (for the lexical neighbours)."""
        return self._stage("lexical_from")

    def dependencies(self) -> tuple[Any, ...]:
        """The stages the graph reads: built and updated before it."""
        return tuple(self._bound[key] for key in self.references() if key in self._bound)

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
            bm25 = self.bm25()
            settings["lexical"] = {
                "neighbors": self.config.lexical_neighbors,
                "bm25_index": bm25.folder.name,
                "k1": bm25.config.k1,
                "b": bm25.config.b,
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
                f"{bm25.name!r} ({bm25.folder} is not built): index the pipeline first (`streamrank index`)"
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
    def _walk_settings(self) -> WalkSettings:
        cfg = self.config
        lexical_weight = cfg.lexical_weight if cfg.lexical_neighbors else None
        return WalkSettings(
            cfg.alpha, cfg.walks, cfg.max_length, cfg.walk_seed, cfg.edges, cfg.edge_weight, lexical_weight
        )

    def _fingerprints(self, solved: _Solved, folder: Path | None = None) -> sp.csr_matrix:
        """The fingerprints of the open graph: loaded, or computed and saved when missing or stale."""
        if solved.fingerprints is not None:
            return solved.fingerprints
        walks = self._walk_settings()
        path = walks.path(folder or self.folder)
        solved.fingerprints = load_fingerprints(path, solved.graph.version)
        if solved.fingerprints is None:
            log.info(
                "ppr stage %r: computing fingerprints for %d nodes (%s)", self.name, len(solved.graph), path.name
            )
            solved.fingerprints = walks.compute(solved.P)
            save_fingerprints(path, solved.fingerprints, solved.graph.version)
        return solved.fingerprints

    def _refresh_fingerprints(
        self, old: _Solved, new: _Solved, changed: np.ndarray, kept: np.ndarray | None
    ) -> None:
        """Carry fingerprints over an update: rows whose walks touched a changed node are re-walked.

        ``kept`` maps new rows to old rows after a delete (None after an add: old rows keep their number).
        """
        if self.config.solver != "montecarlo":
            return  # a fingerprint file left by another setting is stale now; it is redone when loaded
        walks = self._walk_settings()
        new.fingerprints = walks.carry(self._fingerprints(old), new.P, new.graph.version, changed, kept)
        save_fingerprints(walks.path(self.folder), new.fingerprints, new.graph.version)

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
        graph = graph.copy()
        changed = graph.add(ids, base[[position[i] for i in ids]], base, self.lexical_edges(documents))
        return self._commit(old, graph, changed, kept=None)

    def _delete(self, doc_ids: Sequence[str]) -> dict[str, Any]:
        old = self._solved
        assert old is not None
        graph = old.graph.copy()
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
                weights = minmax(np.array([c.score for _, c in top], dtype=np.float64)) + 1.0 / cfg.seeds
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
        cfg = self.config
        S = seed_matrix(seeds, len(solved.graph))
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
