"""Score normalisation and fusion as pure functions over runs (pyserini ``fusion`` semantics).

A run is one retriever's list for one query: (doc id, score), best first.

- :func:`reciprocal_rank`: ``1 / (rrf_k + rank)``, rank 1-based (Cormack et al. 2009, as
  ``pyserini.fusion.reciprocal_rank_fusion``); a missing rank contributes 0.
- :func:`minmax`: ``(s - min) / (max - min)``; a constant list normalises to 1 and a missing score
  contributes 0 (pyserini's ``normalize``).
- :func:`fuse`: several runs into one score per document, by ``rrf``, ``minmax`` or ``zscore``:

  - ``rrf``: ``sum_i w_i / (rrf_k + rank_i)``, a document missing from a list contributes 0;
  - ``minmax``: ``sum_i w_i * (s - min_i) / (max_i - min_i)``, a missing document contributes 0;
  - ``zscore``: ``sum_i w_i * (s - mean_i) / std_i``; a constant list gives 0, and a missing document
    contributes the list's lowest z-score (0 would rank it as an average hit).

- :func:`fuse_with_ppr`: the incoming ranking with PPR scores, for the ``ppr`` stage.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence

import numpy as np
from numpy.typing import ArrayLike

Run = Sequence[tuple[str, float]]
"""One retriever's list for one query: (doc id, score), best first."""


def reciprocal_rank(ranks: ArrayLike, rrf_k: int = 60) -> np.ndarray:
    """``1 / (rrf_k + rank)`` per entry (1-based ranks, float64); NaN (not ranked) gives 0."""
    r = np.asarray(ranks, dtype=np.float64)
    return np.divide(1.0, rrf_k + r, out=np.zeros_like(r), where=~np.isnan(r))


def minmax(values: ArrayLike) -> np.ndarray:
    """Min-max normalise the finite values to [0, 1]; NaN (missing) becomes 0; constant lists give 1."""
    values = np.asarray(values, dtype=np.float64)
    out = np.zeros(len(values))
    finite = ~np.isnan(values)
    if finite.any():
        low, high = values[finite].min(), values[finite].max()
        out[finite] = (values[finite] - low) / (high - low) if high > low else 1.0
    return out


def normalise_run(run: Run, method: str, rrf_k: int = 60) -> dict[str, float]:
    """One run's contribution per document under ``method`` (``rrf``, ``minmax`` or ``zscore``)."""
    if method == "rrf":
        out: dict[str, float] = {}
        values = reciprocal_rank(np.arange(1, len(run) + 1), rrf_k).tolist()
        for (doc_id, _), value in zip(run, values, strict=True):
            out.setdefault(doc_id, value)
        return out
    scores = [s for _, s in run]
    if not scores:
        return {}
    if method == "minmax":
        return {d: v for (d, _), v in zip(run, minmax(scores).tolist(), strict=True)}
    if method == "zscore":
        mean, std = statistics.fmean(scores), statistics.pstdev(scores)
        return {d: (s - mean) / std if std > 0 else 0.0 for d, s in run}
    raise ValueError(f"unknown fusion method {method!r}")


def fuse(
    runs: Sequence[Run],
    method: str = "rrf",
    *,
    rrf_k: int = 60,
    weights: Sequence[float] | None = None,
) -> dict[str, float]:
    """Fused score per document over ``runs`` (see the module docstring for each method)."""
    weights = list(weights) if weights is not None else [1.0] * len(runs)
    if len(weights) != len(runs):
        raise ValueError(f"{len(weights)} weights for {len(runs)} runs")
    fused: dict[str, float] = {}
    floors: list[float] = []
    for run, weight in zip(runs, weights, strict=True):
        contributions = normalise_run(run, method, rrf_k)
        floors.append(min(contributions.values(), default=0.0) if method == "zscore" else 0.0)
        for doc_id, value in contributions.items():
            fused[doc_id] = fused.get(doc_id, 0.0) + weight * value
    if method == "zscore":  # documents missing from a run get that run's lowest z-score
        for run, weight, floor in zip(runs, weights, floors, strict=True):
            present = {doc_id for doc_id, _ in run}
            for doc_id in fused:
                if doc_id not in present:
                    fused[doc_id] += weight * floor
    return fused


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
        return (1.0 - weight) * minmax(incoming_score) + weight * minmax(ppr.astype(np.float64))
    if method == "rrf":
        order = np.argsort(-ppr, kind="stable")
        ppr_rank = np.empty(len(ppr))
        ppr_rank[order] = np.arange(1, len(ppr) + 1)
        first = reciprocal_rank(incoming_rank, rrf_k)
        second = reciprocal_rank(np.where(ppr > 0, ppr_rank, np.nan), rrf_k)
        return (1.0 - weight) * first + weight * second
    raise ValueError(f"unknown fusion {method!r}")
