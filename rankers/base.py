"""The one base class of every reranker: LLM listwise, generative, groupwise, query likelihood,
cross-encoder, E2Rank and the learned ranker.

A reranker reorders the candidates it is given. :meth:`Reranker.run` hands the whole batch of
queries to :meth:`Reranker.rerank_batch`, which by default checks the documents of the batch once
and reranks query by query (:meth:`Reranker.rerank`): the texts of the top ``depth`` are scored by
:meth:`Reranker.score_top` and merged back above the rest (:meth:`Reranker.merge_reranked`).
Rerankers whose model takes many queries at once (cross-encoder, E2Rank) override
``rerank_batch`` and run the batch in one call. Every model call is logged on the ranking with
:meth:`Reranker.record_call`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from streamrank.stage import BaseStage
from streamrank.types import ModelCall, Ranking


class Reranker(BaseStage):
    """Base of the rerankers: depth, candidate texts, merging a reranked top back, model-call log."""

    documents_label: ClassVar[str | None] = None
    """How the missing-text error names this stage (None: by its name)."""
    call_seconds_digits: ClassVar[int | None] = None
    """Digits the seconds of a recorded model call are rounded to (None: kept as measured)."""

    @property
    def depth(self) -> int | None:
        """How many of the incoming candidates are reranked (the config's ``depth``; None: all)."""
        return getattr(self.config, "depth", None)

    def run(self, rankings: Sequence[Ranking]) -> list[Ranking]:
        return self.rerank_batch(rankings)

    def rerank_batch(self, rankings: Sequence[Ranking]) -> list[Ranking]:
        """Rerank a batch of queries; by default the documents are checked once, then each query is reranked."""
        self.require_documents(rankings)
        return [self.rerank(ranking) for ranking in rankings]

    def rerank(self, ranking: Ranking) -> Ranking:
        """One query: its top ``depth`` scored by :meth:`score_top`, the rest kept below in order."""
        texts = self.candidate_texts(ranking)
        if not texts:
            return ranking
        return self.merge_reranked(ranking, self.score_top(ranking, texts))

    def score_top(self, ranking: Ranking, texts: list[str]) -> list[float]:
        """Scores parallel to ``texts`` (the top ``depth``, higher is better); model calls recorded on ``ranking``."""
        raise NotImplementedError

    # ---- shared pieces ---------------------------------------------------------------------------
    def require_documents(self, rankings: Sequence[Ranking]) -> None:
        """Attach the text of each ranking's top ``depth`` from the store; RankerError for any still missing."""
        self.context.require_documents(rankings, self.depth, self.documents_label or self.name)  # type: ignore[arg-type]

    def candidate_texts(self, ranking: Ranking) -> list[str]:
        """The ``contents`` of the top ``depth`` candidates ("" for one without a document)."""
        return [c.document.contents if c.document else "" for c in ranking.candidates[: self.depth]]

    def merge_reranked(self, ranking: Ranking, scores: Sequence[float]) -> Ranking:
        """Reorder the top ``depth`` by ``scores``; the rest follow in their incoming order, scored below."""
        depth = len(ranking.candidates) if self.depth is None else self.depth
        top, rest = ranking.candidates[:depth], ranking.candidates[depth:]
        floor = min(scores) if scores else 0.0
        tail = [floor - 1.0 - i for i in range(len(rest))]
        return ranking.rescored(self.name, [*scores, *tail], keep=self.config.k, candidates=[*top, *rest])

    def record_call(
        self,
        ranking: Ranking,
        model: str,
        *,
        seconds: float,
        prompt_tokens: int = 0,
        output_tokens: int = 0,
        note: str = "",
    ) -> None:
        """Append one model call of this stage to ``ranking.calls``."""
        if self.call_seconds_digits is not None:
            seconds = round(seconds, self.call_seconds_digits)
        ranking.calls.append(ModelCall(self.name, model, prompt_tokens, output_tokens, seconds, note))
