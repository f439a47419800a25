"""Personalized PageRank solvers: pure functions over a row-stochastic scipy matrix ``P``.

``alpha`` is the restart probability.

- :func:`power_iteration`: exact, ``x <- alpha s + (1 - alpha) (x P + (x . dangling) s)``, for a
  batch of seed vectors at once (networkx's convention: a dangling node's mass goes back to the seeds).
- :func:`build_fingerprints` + :func:`fingerprint_ppr`: PowerWalk (Liu et al., 2016). Offline, ``walks``
  random walks with restart from every vertex, simulated for all walkers at once; row ``v`` of the
  sparse fingerprint matrix ``F`` holds ``alpha / walks`` times the visit counts, an unbiased estimate of
  the PPR vector of ``v``. Online, PPR is linear in the seeds, so ``ppr(s) ~ s F``; ``refine_steps``
  exact propagation steps first (PowerWalk's online iteration) shrink the Monte Carlo error by
  ``(1 - alpha) ** refine_steps``. A walk at a dangling node restarts at its own source, so ``s F``
  equals networkx's answer exactly only on graphs without dangling nodes (the symmetrised kNN graph
  has none).
- :func:`carry_fingerprints`: fingerprints over a changed graph, re-walking only the rows whose walks
  touched a changed node.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import scipy.sparse as sp

DEFAULT_ALPHA = 0.15
"""Restart probability (damping 0.85), the published PageRank setting."""


def transition_matrix(adjacency: sp.spmatrix | sp.sparray) -> tuple[sp.csr_matrix, np.ndarray]:
    """Row-normalise a non-negative weighted adjacency into ``P`` (float64 CSR) and the dangling mask."""
    import scipy.sparse as sp

    adj = sp.csr_matrix(adjacency, dtype=np.float64)
    out = np.asarray(adj.sum(axis=1)).ravel()
    dangling = out <= 0
    inv = np.divide(1.0, out, out=np.zeros_like(out), where=~dangling)
    return sp.csr_matrix(sp.diags(inv) @ adj), dangling


def seed_matrix(seeds: Sequence[Mapping[int, float]], n: int) -> sp.csr_matrix:
    """Sparse seed rows (b x n, float64) from one ``{node: mass}`` dict per query."""
    import scipy.sparse as sp

    rows = np.repeat(np.arange(len(seeds)), [len(s) for s in seeds])
    cols = np.array([r for s in seeds for r in s], dtype=np.int64)
    vals = np.array([w for s in seeds for w in s.values()], dtype=np.float64)
    return sp.csr_matrix((vals, (rows, cols)), shape=(len(seeds), n))


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


def carry_fingerprints(
    F: sp.csr_matrix,
    n: int,
    changed: np.ndarray,
    kept: np.ndarray | None,
    walk: Callable[[np.ndarray | None], sp.csr_matrix],
) -> sp.csr_matrix:
    """Fingerprints ``F`` of a graph carried over an update to the new graph of ``n`` nodes.

    ``kept`` maps new rows to old rows after a delete (None after an add: old rows keep their number
    and new nodes are appended). Rows of changed nodes, of new nodes and of every walk that visited a
    changed node are re-walked with ``walk(rows)``; when that is more than a quarter of the graph,
    everything is recomputed with ``walk(None)``.
    """
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
        return walk(None)
    if len(rows):
        return replace_rows(F, rows, walk(rows))
    return F
