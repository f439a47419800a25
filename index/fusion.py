"""Fusion of several retrievers' rankings (pyserini ``fusion`` semantics).

    [[stages]]
    kind = "fusion"
    method = "rrf"          # or "minmax" / "zscore" (normalised score interpolation)
    rrf_k = 60
      [[stages.retrievers]]
      kind = "bm25"
      [[stages.retrievers]]
      kind = "dense"

Each retriever runs on the whole batch (on the supplied pool when there is one). The fused list is
the union of their candidates; a candidate keeps every retriever's score in ``stage_scores`` (under
the retriever's name) and gets the fused score as this stage's score.

- ``rrf``: ``sum_i w_i / (rrf_k + rank_i)``, rank 1-based in retriever i's list; a document missing
  from a list contributes 0 (Cormack et al. 2009, as ``pyserini.fusion.reciprocal_rank_fusion``).
- ``minmax``: ``sum_i w_i * (s - min_i) / (max_i - min_i)``; a constant list normalises to 1 and a
  missing document contributes 0 (pyserini's ``normalize``).
- ``zscore``: ``sum_i w_i * (s - mean_i) / std_i``; a constant list gives 0, and a missing document
  contributes the list's lowest z-score (0 would rank it as an average hit).

Weights default to 1 each. Ties are broken by ascending doc id, as pyserini's ``TrecRun.merge``.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from typing import Any, ClassVar, Literal

from pydantic import Field

from streamrank.errors import ConfigError
from streamrank.stage import BaseStage, StageConfig
from streamrank.types import Candidate, Ranking

Run = Sequence[tuple[str, float]]
"""One retriever's list for one query: (doc id, score), best first."""


class FusionConfig(StageConfig):
    method: Literal["rrf", "minmax", "zscore"] = "rrf"
    rrf_k: int = Field(60, ge=0)
    weights: list[float] | None = None
    """One weight per retriever (default: 1 each)."""
    retrievers: list[dict[str, Any]] = Field(min_length=1)
    """Stage tables of the retrievers to fuse."""


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
        contributions = _normalise(run, method, rrf_k)
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


def _normalise(run: Run, method: str, rrf_k: int) -> dict[str, float]:
    if method == "rrf":
        out: dict[str, float] = {}
        for rank, (doc_id, _) in enumerate(run, start=1):
            out.setdefault(doc_id, 1.0 / (rrf_k + rank))
        return out
    scores = [s for _, s in run]
    if not scores:
        return {}
    if method == "minmax":
        low, high = min(scores), max(scores)
        return {d: (s - low) / (high - low) if high > low else 1.0 for d, s in run}
    if method == "zscore":
        mean, std = statistics.fmean(scores), statistics.pstdev(scores)
        return {d: (s - mean) / std if std > 0 else 0.0 for d, s in run}
    raise ValueError(f"unknown fusion method {method!r}")


class FusionStage(BaseStage):
    """Runs its retrievers on the batch and fuses their lists (``children`` = the retrievers)."""

    Config = FusionConfig
    config: FusionConfig
    is_retriever: ClassVar[bool] = True

    def __init__(self, config: FusionConfig, context: Any) -> None:
        super().__init__(config, context)
        where = f"fusion stage {self.name!r}"
        if config.weights is not None and len(config.weights) != len(config.retrievers):
            raise ConfigError(
                f"{where}: {len(config.weights)} weights for {len(config.retrievers)} retrievers; "
                "give one weight per retriever"
            )
        self.children: list[BaseStage] = [
            context.build_stage(options, where=f"{where}: retrievers[{i}]")
            for i, options in enumerate(config.retrievers)
        ]
        names = [child.name for child in self.children]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ConfigError(
                f"{where}: retriever names must be unique; set `name` to tell apart {duplicates}"
            )

    def run(self, rankings: Sequence[Ranking]) -> list[Ranking]:
        outputs: list[list[Ranking]] = []
        elapsed: list[float] = []
        for child in self.children:
            started = time.perf_counter()
            outputs.append(child.run(rankings))
            elapsed.append((time.perf_counter() - started) * 1000.0)
        fused_rankings = []
        for position, ranking in enumerate(rankings):
            lists = [out[position] for out in outputs]
            scores = fuse(
                [[(c.doc_id, c.score) for c in r.candidates] for r in lists],
                self.config.method,
                rrf_k=self.config.rrf_k,
                weights=self.config.weights,
            )
            union = sorted(_union(lists).values(), key=lambda c: c.doc_id)
            fused = ranking.rescored(self.name, scores, keep=self.config.k, candidates=union)
            for child, child_ranking, ms in zip(self.children, lists, elapsed, strict=True):
                fused.timings_ms[child.name] = fused.timings_ms.get(child.name, 0.0) + ms
                _carry_over(child_ranking, fused)
            fused_rankings.append(fused)
        return fused_rankings


def _union(lists: Sequence[Ranking]) -> dict[str, Candidate]:
    """Every candidate of ``lists`` once, with the stage scores all lists gave it."""
    merged: dict[str, Candidate] = {}
    for ranking in lists:
        for cand in ranking.candidates:
            seen = merged.get(cand.doc_id)
            if seen is None:
                merged[cand.doc_id] = Candidate(
                    doc_id=cand.doc_id,
                    score=cand.score,
                    rank=cand.rank,
                    stage_scores=dict(cand.stage_scores),
                    document=cand.document,
                )
            else:
                seen.stage_scores.update(cand.stage_scores)
                seen.document = seen.document or cand.document
    return merged


def _carry_over(source: Ranking, target: Ranking) -> None:
    """Notes, model calls and the degraded flag a retriever recorded on its own ranking copy."""
    if source.notes is not target.notes:
        target.notes.extend(n for n in source.notes if n not in target.notes)
    if source.calls is not target.calls:
        target.calls.extend(c for c in source.calls if not any(c is t for t in target.calls))
    target.degraded = target.degraded or source.degraded
