"""The corpus graph: a k-nearest-neighbour graph over document embeddings, optional lexical
neighbours, plus user-supplied edges.

Nodes are documents (row ``i`` is ``ids[i]``); an edge ``u - v`` with weight ``cos(u, v)`` joins each
document to its ``neighbors`` most similar documents (exact inner-product search with FAISS over
the dense stage's normalised embeddings), symmetrised by taking the larger weight of ``u -> v`` and
``v -> u``. Optional user edges (citations, links) come from an edge list file, one ``src dst
[weight]`` per line, and are added on top with a configurable weight.

Lexical neighbours (GAR, MacAvaney et al., CIKM 2022): each document's text used as a BM25 query,
its top hits become its neighbours. They are kept in a second matrix (``lexical``), weighted by
the BM25 score over the row's best score and symmetrised like the kNN edges; the caller computes
them (the graph knows no index) and passes ``(src, dst, weight)`` id triples.

``add`` links new documents to their k nearest (and given lexical) neighbours in both directions
without trimming existing neighbour lists, so after many additions the graph is a superset of what
a rebuild gives;
``delete`` drops rows and columns. Both return the rows whose out-edges changed, which is what the
Monte Carlo fingerprints need to refresh.

Also here: :func:`personalised_query`, the query-vector mixing a personalised dense search uses.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import scipy.sparse as sp

GRAPH_FILE = "graph.npz"
NEXT_GRAPH_FILE = "graph.next.npz"
"""A refreshed graph written but not yet switched to (a crash there leaves it; the next refresh replaces it)."""


def log_path(folder: Path, tag: str) -> Path:
    """The write log continuing the saved graph whose ``log`` tag is ``tag``."""
    return Path(folder) / f"graph-segments{tag}.log"


def remove_stray_logs(folder: Path, tag: str) -> None:
    """Delete write logs other than the one of ``tag`` (left by a refresh); hold the folder's writer lock."""
    keep = log_path(folder, tag)
    for path in Path(folder).glob("graph-segments*.log"):
        if path != keep:
            path.unlink(missing_ok=True)


def personalised_query(query_vec: np.ndarray, history_vecs: np.ndarray, weight: float) -> np.ndarray:
    """Mix query vector(s) with the centroid of a user's history embeddings, then L2-normalise.

    ``(1 - weight) * q + weight * mean(history)``; with no history (or ``weight == 0``) ``q`` is
    returned unchanged. ``query_vec`` may be one vector (d) or a batch (b x d) sharing one history.
    """
    history = np.asarray(history_vecs, dtype=np.float32).reshape(-1, np.shape(query_vec)[-1])
    if weight <= 0 or len(history) == 0:
        return np.asarray(query_vec, dtype=np.float32)
    mixed = (1.0 - weight) * np.asarray(query_vec, dtype=np.float32) + weight * history.mean(axis=0)
    norm = np.linalg.norm(mixed, axis=-1, keepdims=True)
    return (mixed / np.maximum(norm, 1e-12)).astype(np.float32)


def knn_edges(
    queries: np.ndarray, base: np.ndarray, k: int, query_rows: np.ndarray | None = None, batch: int = 16384
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact inner-product kNN (FAISS) of ``queries`` in ``base``, as COO arrays (row, col, sim).

    ``query_rows[i]`` is the base row of query ``i`` (its own match is skipped) and the COO row;
    default ``arange``. Returns at most ``k`` edges per query, best first.
    """
    import faiss

    n_q = len(queries)
    rows_of = np.arange(n_q) if query_rows is None else np.asarray(query_rows)
    k_eff = min(k + 1, len(base))
    if n_q == 0 or k_eff == 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, np.zeros(0, dtype=np.float32)
    out_r, out_c, out_s = [], [], []
    base32 = np.ascontiguousarray(base, dtype=np.float32)
    for lo in range(0, n_q, batch):
        q = np.ascontiguousarray(queries[lo : lo + batch], dtype=np.float32)
        sims, idx = faiss.knn(q, base32, k_eff, metric=faiss.METRIC_INNER_PRODUCT)
        own = rows_of[lo : lo + batch, None]
        valid = (idx >= 0) & (idx != own)
        valid &= np.cumsum(valid, axis=1) <= k
        r = np.broadcast_to(own, idx.shape)
        out_r.append(r[valid])
        out_c.append(idx[valid])
        out_s.append(sims[valid])
    return (
        np.concatenate(out_r),
        np.concatenate(out_c).astype(np.int64),
        np.concatenate(out_s).astype(np.float32),
    )


def symmetric_matrix(
    rows: np.ndarray, cols: np.ndarray, weights: np.ndarray, n: int, min_weight: float = 0.0
) -> sp.csr_matrix:
    """An n x n matrix of the directed edges above ``min_weight``, symmetrised by the larger direction."""
    import scipy.sparse as sp

    keep = weights > min_weight
    directed = sp.csr_matrix((weights[keep], (rows[keep], cols[keep])), shape=(n, n), dtype=np.float32)
    return sp.csr_matrix(directed.maximum(directed.T))


def read_edge_list(path: str | Path) -> list[tuple[str, str, float]]:
    """Parse an edge list file: ``src dst [weight]`` per line (whitespace or tab separated; ``#`` comments)."""
    edges = []
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        parts = line.split("#", 1)[0].split()
        if not parts:
            continue
        if len(parts) not in (2, 3):
            raise ValueError(f"{path}:{number}: expected 'src dst [weight]', got {line!r}")
        weight = float(parts[2]) if len(parts) == 3 else 1.0
        edges.append((parts[0], parts[1], weight))
    return edges


def file_digest(path: str | Path) -> str:
    """SHA-256 of a file's bytes (identifies the edge list a graph was built with)."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@dataclass
class CorpusGraph:
    """A document graph: ``ids`` (row order), the symmetric kNN similarity matrix, lexical and user edges."""

    ids: list[str]
    knn: sp.csr_matrix
    neighbors: int
    min_similarity: float = 0.0
    user_edges: list[tuple[str, str, float]] = field(default_factory=list)
    version: str = field(default_factory=lambda: uuid.uuid4().hex)
    """New for every built or refreshed graph; derived data (fingerprints) records the version it was made from."""
    lexical: sp.csr_matrix | None = None
    """Symmetric lexical-neighbour weights (an empty matrix when the graph has none)."""
    log: str = ""
    """Tag of the write log that continues this saved graph (``graph-segments<log>.log``)."""
    row_of: dict[str, int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.row_of = {doc_id: i for i, doc_id in enumerate(self.ids)}
        if self.lexical is None:
            self.lexical = _empty(len(self.ids))

    def __len__(self) -> int:
        return len(self.ids)

    # ---- construction ---------------------------------------------------------------------------
    @classmethod
    def from_embeddings(
        cls, ids: Sequence[str], embeddings: np.ndarray, *, neighbors: int = 10, min_similarity: float = 0.0
    ) -> CorpusGraph:
        """The symmetrised kNN graph of L2-normalised ``embeddings`` (row i belongs to ``ids[i]``)."""
        if len(ids) != len(embeddings):
            raise ValueError(f"{len(ids)} ids for {len(embeddings)} embeddings")
        graph = cls(list(ids), _empty(len(ids)), neighbors, min_similarity)
        graph.knn = symmetric_matrix(*knn_edges(embeddings, embeddings, neighbors), len(ids), min_similarity)
        return graph

    def link_lexical(self, edges: Iterable[tuple[str, str, float]]) -> np.ndarray:
        """Merge lexical ``(src, dst, weight)`` edges (symmetrised; unknown ids skipped); rows touched."""
        import scipy.sparse as sp

        r, c, w = self._edge_rows(edges)
        if not len(r):
            return np.zeros(0, dtype=np.int64)
        linked = symmetric_matrix(r, c, w, len(self))
        self.lexical = sp.csr_matrix(self.lexical.maximum(linked))
        return np.unique(np.concatenate([r, c])).astype(np.int64)

    def _edge_rows(self, edges: Iterable[tuple[str, str, float]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(src rows, dst rows, float32 weights)`` of the id edges whose both ends are in the graph."""
        row_of = self.row_of
        found = [(row_of[s], row_of[d], w) for s, d, w in edges if s in row_of and d in row_of]
        if not found:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
        r, c, w = (np.array(col) for col in zip(*found, strict=True))
        return r, c, w.astype(np.float32)

    # ---- the matrix solvers use -----------------------------------------------------------------
    def user_matrix(self) -> tuple[sp.csr_matrix, int]:
        """User edges between known documents as a sparse matrix, and how many edges were skipped."""
        import scipy.sparse as sp

        n = len(self.ids)
        r, c, w = self._edge_rows(self.user_edges)
        skipped = len(self.user_edges) - len(r)
        if not len(r):
            return _empty(n), skipped
        return sp.csr_matrix((w, (r, c)), shape=(n, n)), skipped

    def adjacency(self, user_weight: float = 1.0, lexical_weight: float = 1.0) -> sp.csr_matrix:
        """kNN similarities plus ``lexical_weight`` times the lexical and ``user_weight`` times the
        user edges (duplicates summed)."""
        adjacency = self.knn
        if self.lexical.nnz and lexical_weight:
            adjacency = (adjacency + lexical_weight * self.lexical).tocsr()
        if self.user_edges and user_weight:
            adjacency = (adjacency + user_weight * self.user_matrix()[0]).tocsr()
        return adjacency

    # ---- persistence ----------------------------------------------------------------------------
    def save(self, folder: Path, name: str = GRAPH_FILE) -> None:
        """Write ``graph.npz`` (matrix, ids, settings, version, log tag) atomically into ``folder``."""
        meta = {
            "neighbors": self.neighbors, "min_similarity": self.min_similarity, "version": self.version, "log": self.log,
        }
        lex = self.lexical
        lexical = {"lexical_data": lex.data, "lexical_indices": lex.indices, "lexical_indptr": lex.indptr}
        save_sparse(Path(folder) / name, self.knn, meta, ids=np.array(self.ids, dtype=str), **lexical)

    @classmethod
    def load(cls, folder: Path, user_edges: list[tuple[str, str, float]] | None = None) -> CorpusGraph:
        """The graph ``save`` wrote into ``folder``, with ``user_edges`` on top."""
        import scipy.sparse as sp

        knn, meta, arrays = load_sparse(Path(folder) / GRAPH_FILE)
        ids = [str(i) for i in arrays["ids"]]
        lexical = None
        if "lexical_indptr" in arrays:  # graphs saved before lexical edges existed have none
            parts = (arrays["lexical_data"], arrays["lexical_indices"], arrays["lexical_indptr"])
            lexical = sp.csr_matrix(parts, shape=knn.shape)
        user = list(user_edges or [])
        graph = cls(ids, knn, meta["neighbors"], meta["min_similarity"], user, meta["version"], lexical)
        graph.log = str(meta.get("log", ""))
        return graph

    def nbytes(self) -> int:
        return int(sum(m.data.nbytes + m.indices.nbytes + m.indptr.nbytes for m in (self.knn, self.lexical)))


def save_sparse(path: Path, matrix: sp.csr_matrix, meta: dict, **arrays: np.ndarray) -> None:
    """Write a CSR matrix, a JSON-able ``meta`` dict and extra arrays as one ``.npz``, atomically."""
    from streamrank.index.manifest import write_atomic

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as handle:
            np.savez(
                handle,
                data=matrix.data,
                indices=matrix.indices,
                indptr=matrix.indptr,
                shape=np.array(matrix.shape),
                meta=np.array(json.dumps(meta)),
                **arrays,
            )

    write_atomic(path, write)


def load_sparse(path: Path) -> tuple[sp.csr_matrix, dict, dict[str, np.ndarray]]:
    """What :func:`save_sparse` wrote: the matrix, ``meta`` and the extra arrays."""
    import scipy.sparse as sp

    with np.load(path) as z:
        matrix = sp.csr_matrix((z["data"], z["indices"], z["indptr"]), shape=tuple(z["shape"]))
        meta = json.loads(str(z["meta"]))
        arrays = {k: z[k] for k in z.files if k not in {"data", "indices", "indptr", "shape", "meta"}}
    return matrix, meta, arrays


def _empty(n: int) -> sp.csr_matrix:
    import scipy.sparse as sp

    return sp.csr_matrix((n, n), dtype=np.float32)


class LiveGraph:
    """A corpus graph that takes writes in O(what they touch): a :class:`CorpusGraph` snapshot (the last
    full refresh) plus the rows changed since, as dicts, and tombstones for deleted documents.

    Rows never move while the graph is live (new documents get new rows, deleted ones a tombstone);
    :meth:`snapshot` renumbers them into a new :class:`CorpusGraph` (O(edges): a full refresh). Every
    change goes through :meth:`apply`, with the op a write logs, so replaying a log rebuilds the state.
    """

    NODE, KNN, LEXICAL = "n", "k", "l"

    def __init__(self, base: CorpusGraph) -> None:
        self.base = base
        self.ids: list[str] = list(base.ids)
        self.row_of: dict[str, int] = dict(base.row_of)
        self.rows: dict[str, dict[int, dict[int, float]]] = {self.KNN: {}, self.LEXICAL: {}}
        self.dead: set[int] = set()
        self.changed: set[str] = set()
        """Documents added, replaced or deleted since the snapshot (the stage's ``staleness``)."""

    def __len__(self) -> int:
        return len(self.row_of)

    def copy(self) -> LiveGraph:
        """A copy later writes do not change (the snapshot shared: it is never written to)."""
        out = LiveGraph(self.base)
        out.ids, out.row_of, out.dead, out.changed = list(self.ids), dict(self.row_of), set(self.dead), set(self.changed)
        out.rows = {kind: {row: dict(edges) for row, edges in rows.items()} for kind, rows in self.rows.items()}
        return out

    def __contains__(self, doc_id: str) -> bool:
        return doc_id in self.row_of

    def live_ids(self) -> list[str]:
        return [doc_id for row, doc_id in enumerate(self.ids) if row not in self.dead]

    def row(self, kind: str, row: int) -> dict[int, float]:
        """The current neighbours of ``row`` (weights by row), copied from the snapshot on first change."""
        rows = self.rows[kind]
        if row not in rows:
            matrix = self.base.knn if kind == self.KNN else self.base.lexical
            if row < matrix.shape[0]:
                lo, hi = matrix.indptr[row], matrix.indptr[row + 1]
                rows[row] = dict(zip(matrix.indices[lo:hi].tolist(), matrix.data[lo:hi].tolist(), strict=True))
            else:
                rows[row] = {}
        return rows[row]

    def _unlink(self, row: int) -> None:
        """Drop every edge touching ``row`` (both directions)."""
        for kind in (self.KNN, self.LEXICAL):
            for other in list(self.row(kind, row)):
                self.row(kind, other).pop(row, None)
            self.rows[kind][row] = {}

    def _link(self, kind: str, a: int, b: int, weight: float) -> None:
        for u, v in ((a, b), (b, a)):
            edges = self.row(kind, u)
            edges[v] = max(edges.get(v, 0.0), weight)

    def apply(self, edges: Sequence[Sequence[str]], weights: Sequence[float]) -> None:
        """Apply one logged add: ``(doc, "", "n")`` entries name the documents added or replaced (their
        old edges dropped), then ``(src, dst, "k" | "l")`` entries link kNN / lexical edges both ways
        (the larger weight kept; kNN edges at or below ``min_similarity`` and unknown ends skipped)."""
        for (doc_id, _, kind), _w in zip(edges, weights, strict=True):
            if kind != self.NODE:
                continue
            row = self.row_of.get(doc_id)
            if row is None:
                self.row_of[doc_id] = len(self.ids)
                self.ids.append(doc_id)
            else:
                self._unlink(row)
            self.changed.add(doc_id)
        for (src, dst, kind), weight in zip(edges, weights, strict=True):
            a, b = self.row_of.get(src), self.row_of.get(dst)
            if kind == self.NODE or a is None or b is None or a == b:
                continue
            if kind == self.KNN and weight <= self.base.min_similarity:
                continue
            self._link(kind, a, b, float(weight))

    def delete(self, doc_ids: Iterable[str]) -> list[str]:
        """Tombstone documents (unknown ids ignored); returns those deleted."""
        gone = []
        for doc_id in doc_ids:
            row = self.row_of.pop(doc_id, None)
            if row is None:
                continue
            self._unlink(row)
            self.dead.add(row)
            self.changed.add(doc_id)
            gone.append(doc_id)
        return gone

    def snapshot(self) -> tuple[CorpusGraph, np.ndarray, np.ndarray]:
        """The live graph as a new :class:`CorpusGraph` (tombstones dropped, rows renumbered), the new
        rows whose edges changed since the snapshot, and ``kept``: the old row of every surviving
        snapshot row (the surviving snapshot rows come first, in order, then the new documents)."""
        import scipy.sparse as sp

        n_old, n = len(self.base.ids), len(self.ids)
        alive = np.ones(n, dtype=bool)
        alive[list(self.dead)] = False
        new_row = np.cumsum(alive) - 1
        matrices = []
        for kind, matrix in ((self.KNN, self.base.knn), (self.LEXICAL, self.base.lexical)):
            overlay = self.rows[kind]
            keep_rows = np.ones(n_old, dtype=np.float32)
            keep_rows[[r for r in overlay if r < n_old]] = 0.0
            base = sp.csr_matrix(sp.diags(keep_rows) @ matrix)
            base.resize((n, n))
            r = [row for row, edges in overlay.items() for _ in edges]
            c = [col for edges in overlay.values() for col in edges]
            w = [weight for edges in overlay.values() for weight in edges.values()]
            changed = sp.csr_matrix((np.array(w, dtype=np.float32), (r, c)), shape=(n, n))
            merged = (base + changed).tocsr()
            merged = merged[alive][:, alive].tocsr()
            merged.eliminate_zeros()
            matrices.append(merged)
        ids = [doc_id for doc_id, a in zip(self.ids, alive, strict=True) if a]
        graph = CorpusGraph(
            ids, matrices[0], self.base.neighbors, self.base.min_similarity, list(self.base.user_edges),
            lexical=matrices[1],
        )
        touched = sorted({row for rows in self.rows.values() for row in rows if alive[row]})
        kept = np.flatnonzero(alive[:n_old]).astype(np.int64)
        return graph, new_row[touched].astype(np.int64), kept
