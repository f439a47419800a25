"""The ``fusion`` stage: several retrievers' rankings fused into one (pyserini ``fusion`` semantics).

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
the retriever's name) and gets the fused score as this stage's score. The methods are the pure
functions of :mod:`streamrank.index.scores` (``fuse``): ``rrf`` (``sum_i w_i / (rrf_k + rank_i)``),
``minmax`` and ``zscore`` (normalised score interpolation). Weights default to 1 each. Ties are
broken by ascending doc id, as pyserini's ``TrecRun.merge``.

Serving a request for the top ``k`` (fusion as the last stage), each retriever searches only
``serve_depth`` (default 100) deep instead of its ``k``: most of a 1,000-deep hybrid request was the
two deep searches and fusing 2,000 hits (BENCHMARKS.md).

The ``score_fusion`` stage (:class:`ScoreFusionStage`) fuses, with the same functions, the scores that
earlier stages already gave the candidates: a reranker with its first stage.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any, Literal

from pydantic import Field

from streamrank.errors import ConfigError
from streamrank.index.scores import fuse
from streamrank.stage import BaseStage, StageConfig, check_unique_names
from streamrank.types import Candidate, Ranking


class FusionConfig(StageConfig):
    method: Literal["rrf", "minmax", "zscore"] = "rrf"
    rrf_k: int = Field(60, ge=0)
    weights: list[float] | None = None
    """One weight per retriever (default: 1 each)."""
    retrievers: list[dict[str, Any]] = Field(min_length=1)
    """Stage tables of the retrievers to fuse."""
    serve_depth: int | None = Field(100, ge=1)
    """How deep each retriever searches when this fusion is the pipeline's last stage answering a request
    for its top ``k``: ``max(k, serve_depth)``, capped by the retriever's own ``k`` (so a value of at
    least the retrievers' ``k``, or None, keeps that ``k``). A deliberate approximation (a document below this depth in every list cannot reach the
    answer), which :func:`run` at full depth (evaluation) does not make; its cost in nDCG@10 is in
    BENCHMARKS.md (``streamrank eval --top 10`` measures the serving path)."""


class FusionStage(BaseStage):
    """Runs its retrievers on the batch and fuses their lists (``children`` = the retrievers)."""

    Config = FusionConfig
    config: FusionConfig

    def __init__(self, config: FusionConfig, context: Any) -> None:
        super().__init__(config, context)
        where = f"fusion stage {self.name!r}"
        if config.weights is not None and len(config.weights) != len(config.retrievers):
            raise ConfigError(
                f"{where}: {len(config.weights)} weights for {len(config.retrievers)} retrievers; "
                "give one weight per retriever"
            )
        self.retrievers: list[BaseStage] = [
            context.build_stage(options, where=f"{where}: retrievers[{i}]")
            for i, options in enumerate(config.retrievers)
        ]
        check_unique_names(self.retrievers, where, what="retriever")

    @property
    def children(self) -> list[BaseStage]:
        """The retrievers, in their configured order."""
        return self.retrievers

    def run(self, rankings: Sequence[Ranking]) -> list[Ranking]:
        return self._fuse(rankings, lambda child: child.run(rankings))

    def run_top(self, rankings: Sequence[Ranking], k: int) -> list[Ranking]:
        """Fusion of the retrievers' best ``max(k, serve_depth)`` (see ``FusionConfig.serve_depth``)."""
        if self.config.serve_depth is None:
            return self.run(rankings)
        depth = max(k, self.config.serve_depth)
        return self._fuse(rankings, lambda child: child.run_top(rankings, depth))

    def _fuse(self, rankings: Sequence[Ranking], run_child: Callable[[BaseStage], list[Ranking]]) -> list[Ranking]:
        outputs: list[list[Ranking]] = []
        elapsed: list[float] = []
        for child in self.children:
            started = time.perf_counter()
            outputs.append(run_child(child))
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


class ScoreFusionConfig(StageConfig):
    stages: list[str] = Field(min_length=2)
    """Names of earlier stages (or fusion retrievers) whose scores each candidate carries, e.g. the first
    stage and the reranker after it."""
    method: Literal["rrf", "minmax", "zscore"] = "rrf"
    rrf_k: int = Field(60, ge=0)
    weights: list[float] | None = None
    """One weight per named stage (default: 1 each)."""


class ScoreFusionStage(BaseStage):
    """Fuses the scores earlier stages gave the candidates (``stage_scores``) into one, by the same
    :func:`~streamrank.index.scores.fuse` as the fusion stage: a reranker fused with its first stage

        [[stages]]
        kind = "score_fusion"
        stages = ["fusion", "e2rank"]   # the hybrid first stage and the reranker after it
        method = "rrf"

    Each named stage's scores form one run (best first); a candidate a stage did not score is missing
    from that run. Only the candidates this stage receives are fused (a reranker's tail keeps the
    tail scores it was given).
    """

    Config = ScoreFusionConfig
    config: ScoreFusionConfig

    def __init__(self, config: ScoreFusionConfig, context: Any) -> None:
        super().__init__(config, context)
        if config.weights is not None and len(config.weights) != len(config.stages):
            raise ConfigError(
                f"score_fusion stage {self.name!r}: {len(config.weights)} weights for {len(config.stages)} "
                "stages; give one weight per stage"
            )

    def reads_scores_of(self) -> Sequence[str]:
        return self.config.stages

    def run(self, rankings: Sequence[Ranking]) -> list[Ranking]:
        cfg = self.config
        out = []
        for ranking in rankings:
            runs = [
                sorted(
                    ((c.doc_id, c.stage_scores[name]) for c in ranking.candidates if name in c.stage_scores),
                    key=lambda pair: -pair[1],
                )
                for name in cfg.stages
            ]
            scores = fuse(runs, cfg.method, rrf_k=cfg.rrf_k, weights=cfg.weights)
            by_id = sorted(ranking.candidates, key=lambda c: c.doc_id)  # ties by doc id, as the fusion stage
            out.append(ranking.rescored(self.name, scores, keep=cfg.k, candidates=by_id))
        return out
