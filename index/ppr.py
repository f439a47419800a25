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
from collections.abc import Container, Iterator, Mapping, Sequence
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
    from streamrank.index.graph import CorpusGraph, LiveGraph

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
    refresh_after: int = Field(1000, ge=1)
    """Documents changed since the last full refresh of the graph (``staleness``) that start a refresh
    in the background. Writes only append to a log; queries walk the last refreshed graph, with
    documents deleted since filtered out (documents added since join it at the refresh)."""
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


class _Alive(Mapping[str, int]):
    """The rows of the refreshed graph's documents that are still live (walk-time tombstone filter)."""

    def __init__(self, row_of: Mapping[str, int], alive: Container[str]) -> None:
        self.row_of, self.alive = row_of, alive

    def __getitem__(self, doc_id: str) -> int:
        if doc_id not in self.alive:
            raise KeyError(doc_id)
        return self.row_of[doc_id]

    def __contains__(self, doc_id: object) -> bool:
        return doc_id in self.row_of and doc_id in self.alive

    def __iter__(self) -> Iterator[str]:
        return (d for d in self.row_of if d in self.alive)

    def __len__(self) -> int:
        return sum(1 for _ in self)


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
        import threading

        self._solved: _Solved | None = None
        self._live: LiveGraph | None = None
        self._log_end = 0
        self._refreshing = threading.Lock()
        self._refresh_thread: threading.Thread | None = None
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
        from streamrank.index.dense_segments import new_generation
        from streamrank.index.graph import CorpusGraph, LiveGraph

        started = time.perf_counter()
        ids = [d.id for d in documents]
        graph = CorpusGraph.from_embeddings(
            ids,
            self.dense().embeddings_for(ids),
            neighbors=self.config.neighbors,
            min_similarity=self.config.min_similarity,
        )
        graph.link_lexical(self.lexical_edges(documents))
        graph.log = new_generation()  # a fresh log: one an older build left is a stray
        graph.save(folder)
        info = {**self._graph_counts(LiveGraph(graph)), "build_seconds": round(time.perf_counter() - started, 2)}
        if self.config.solver == "montecarlo":  # precomputed offline, with the index
            graph.user_edges = self._user_edges()
            solved = self._solve_state(graph)
            self._fingerprints(solved, folder)
            info["fingerprint_seconds"] = round(time.perf_counter() - started - info["build_seconds"], 2)
        return info

    def _open(self, folder: Path, manifest: dict[str, Any]) -> None:
        from streamrank.index.dense_segments import read_log
        from streamrank.index.graph import CorpusGraph, LiveGraph, log_path

        graph = CorpusGraph.load(folder, self._user_edges())
        live = LiveGraph(graph)
        records, self._log_end = read_log(log_path(folder, graph.log))
        for record in records:
            self._replay(live, record)
        self._solved, self._live = self._solve_state(graph), live

    @staticmethod
    def _replay(live: Any, record: Any) -> None:
        from streamrank.index.dense_segments import ADD

        if record.op == ADD:
            live.apply(record.ids, record.vectors[:, 0])
        else:
            live.delete(record.ids)

    def _release(self) -> None:
        self._solved = self._live = None

    def _live_ids(self) -> list[str]:
        return self._live.live_ids() if self._live else []

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

    # ---- updates: appended to a log, walked after a refresh ----------------------------------------
    WRITES_TAKE_LOCK = False  # searches are held only while a logged change is applied in memory

    def _neighbours(self, ids: list[str]) -> list[tuple[str, str, float]]:
        """``(doc, neighbour, cosine)`` for the ``neighbors`` nearest documents of each of ``ids`` in the
        graph (or among ``ids``): searched in the dense stage's index when it offers ``nearest`` (the
        vectors already there, nothing copied), else exactly over the stored vectors."""
        from streamrank.index.graph import knn_edges

        live, k, source = self._live, self.config.neighbors, self.dense()
        assert live is not None
        member = set(ids)
        if hasattr(source, "nearest"):
            slack = min(len(live.changed), 4 * k) + 1  # the index may hold deleted or unlinked rows
            found = source.nearest(ids, k + slack)
            return [
                (doc_id, other, score)
                for doc_id, hits in zip(ids, found, strict=True)
                for other, score in [h for h in hits if h[0] != doc_id and (h[0] in live or h[0] in member)][:k]
            ]
        everything = [i for i in live.live_ids() if i not in member] + ids
        base = source.embeddings_for(everything)
        rows = np.arange(len(everything) - len(ids), len(everything))
        r, c, s = knn_edges(base[rows], base, k, query_rows=rows)
        return [(everything[a], everything[b], float(w)) for a, b, w in zip(r, c, s, strict=True)]

    def _append(self, op: int, ids: list[Any], weights: np.ndarray | None = None) -> dict[str, Any]:
        """Append one record to the graph's log (fsynced: durable when this returns), then apply it."""
        from streamrank.index.dense_segments import Record, append, encode_record
        from streamrank.index.graph import log_path

        live, solved = self._live, self._solved
        assert live is not None and solved is not None
        vectors = None if weights is None else np.asarray(weights, dtype=np.float32).reshape(-1, 1)
        end = append(log_path(self.folder, solved.graph.log), encode_record(op, ids, vectors), self._log_end)
        with self.lock:
            self._log_end = end
            self._replay(live, Record(op, ids, vectors))
        if len(live.changed) >= self.config.refresh_after:
            self.refresh(background=True)
        return self._info()

    def _add(self, documents: Sequence[Document]) -> dict[str, Any]:
        from streamrank.index.dense_segments import ADD
        from streamrank.index.graph import LiveGraph

        ids = list(dict.fromkeys(d.id for d in documents))
        edges: list[Any] = [[doc_id, "", LiveGraph.NODE] for doc_id in ids]
        weights = [0.0] * len(ids)
        for kind, found in ((LiveGraph.KNN, self._neighbours(ids)), (LiveGraph.LEXICAL, self.lexical_edges(documents))):
            edges += [[src, dst, kind] for src, dst, _ in found]
            weights += [w for _, _, w in found]
        return self._append(ADD, edges, np.array(weights))

    def _delete(self, doc_ids: Sequence[str]) -> dict[str, Any]:
        from streamrank.index.dense_segments import DELETE

        assert self._live is not None
        gone = [d for d in doc_ids if d in self._live]
        return self._append(DELETE, gone) if gone else self._info()

    def _info(self) -> dict[str, Any]:
        live = self._live
        assert live is not None
        return {**(self._manifest or {}).get("info", {}), **self._graph_counts(live)}

    def _graph_counts(self, live: Any) -> dict[str, int]:
        """The graph's size for the index manifest: documents, the edges of the last refreshed graph
        (lexical ones only when the option is on) and ``staleness``, the documents changed since."""
        graph = live.base
        counts = {"doc_count": len(live), "edges": int(graph.knn.nnz), "staleness": len(live.changed)}
        if self.config.lexical_neighbors:
            counts["lexical_edges"] = int(graph.lexical.nnz)
        return counts

    def staleness(self) -> int:
        """Documents added, replaced or deleted since the graph queries walk was last refreshed."""
        self._ensure_open()
        return len(self._live.changed) if self._live else 0

    def refresh(self, background: bool = False) -> bool:
        """Fold the log into a new full graph (renumbered, transition matrix and fingerprints redone) and
        switch to it crash-safely; returns False when a refresh is already running (or, with
        ``background``, once the thread has started)."""
        import threading

        if not self._refreshing.acquire(blocking=False):
            return False
        if not background:
            try:
                self._refresh()
            finally:
                self._refreshing.release()
            return True

        def run() -> None:
            try:
                self._refresh()
            except Exception:
                log.exception("ppr stage %r: background refresh failed (the log keeps every write)", self.name)
            finally:
                self._refreshing.release()

        self._refresh_thread = threading.Thread(target=run, name=f"refresh-{self.name}", daemon=True)
        self._refresh_thread.start()
        return False

    def wait_for_refresh(self) -> None:
        """Return once a background refresh that is running has finished."""
        thread = self._refresh_thread
        if thread is not None:
            thread.join()

    def close(self) -> None:
        self.wait_for_refresh()
        super().close()

    def _refresh(self) -> None:
        """The refresh: snapshot the live graph under the lock (O(changed rows)), build and write the new
        graph with no lock, then under the writer lock carry the records appended meanwhile into the new
        graph's log, switch ``graph.npz`` (the atomic step) and drop the old log."""
        import os

        from streamrank.index import manifest as mf
        from streamrank.index.dense_segments import (
            append,
            encode_record,
            fault_point,
            fsync_folder,
            new_generation,
            read_log,
        )
        from streamrank.index.graph import GRAPH_FILE, NEXT_GRAPH_FILE, LiveGraph, log_path, remove_stray_logs

        self._ensure_open()
        with self.lock:
            live, old, start = self._live, self._solved, self._log_end
            assert live is not None and old is not None
            frozen = live.copy()
        graph, changed, kept = frozen.snapshot()
        graph.user_edges, graph.log = list(old.graph.user_edges), new_generation()
        new = self._solve_state(graph)
        if self.config.solver == "montecarlo":
            walks = self._walk_settings()
            moved = self._fingerprints(old)[kept][:, kept].tocsr()
            new.fingerprints = walks.carry(moved, new.P, graph.version, changed, None)
            save_fingerprints(walks.path(self.folder), new.fingerprints, graph.version)
        graph.save(self.folder, NEXT_GRAPH_FILE)
        fault_point("graph-refresh-written")
        with mf.writer_lock(self.folder):
            records, end = read_log(log_path(self.folder, old.graph.log), start)
            fresh, new_log = LiveGraph(graph), log_path(self.folder, graph.log)
            new_log.unlink(missing_ok=True)
            if records:  # written while the new graph was built: they continue it
                payload = b"".join(
                    encode_record(r.op, r.ids, r.vectors) for r in records
                )
                append(new_log, payload, 0)
            for record in records:
                self._replay(fresh, record)
            with self.lock:
                os.replace(self.folder / NEXT_GRAPH_FILE, self.folder / GRAPH_FILE)
                fsync_folder(self.folder)
                self._solved, self._live, self._log_end = new, fresh, (end - start if records else 0)
            fault_point("graph-refresh-switched")
            remove_stray_logs(self.folder, graph.log)
            self._save_manifest(self._info(), self.manifest_checksum())

    # ---- ranking ----------------------------------------------------------------------------------
    def seed_vector(self, ranking: Ranking, row_of: Mapping[str, int]) -> dict[int, float]:
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
            assert self._live is not None
            row_of = _Alive(solved.graph.row_of, self._live)  # documents deleted since the refresh: filtered
            seeds = [self.seed_vector(r, row_of) for r in rankings]
            active = [i for i, s in enumerate(seeds) if s]
            ppr = self._ppr_vectors(solved, [seeds[i] for i in active]) if active else None
            ids = solved.graph.ids
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

    def _rerank(self, ranking: Ranking, x: np.ndarray, ids: list[str], row_of: Mapping[str, int]) -> Ranking:
        cfg = self.config
        pool = list(ranking.candidates)
        in_pool = {c.doc_id for c in pool}
        if cfg.expand:
            depth = min(len(x), cfg.expand + len(pool))
            best = np.argpartition(-x, depth - 1)[:depth]
            best = best[np.argsort(-x[best], kind="stable")]
            added = [int(r) for r in best if x[r] > 0 and ids[r] not in in_pool and ids[r] in row_of][: cfg.expand]
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
