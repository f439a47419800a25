"""Pointwise reranking with a sentence-transformers ``CrossEncoder`` (query, passage) -> score.

No cross-encoder ships offline: configure ``model`` with a Hugging Face id (when online) or a local
folder. The top ``depth`` are rescored; the rest follow in their incoming order
(:meth:`~streamrank.rankers.base.Reranker.merge_reranked`, shared by every reranker). The pairs of
all the batch's queries go through the model in one call.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, ClassVar

from pydantic import Field

from streamrank.rankers.base import Reranker
from streamrank.stage import StageConfig
from streamrank.types import Ranking


class CrossEncoderConfig(StageConfig):
    model: str
    """Hugging Face id or local folder of a sentence-transformers CrossEncoder."""
    depth: int = Field(100, ge=1)
    """How many of the incoming candidates are scored (the rest follow in their incoming order)."""
    batch_size: int = Field(32, ge=1)
    max_length: int | None = None
    """Token limit per (query, passage) pair; None keeps the model's own."""


class CrossEncoderReranker(Reranker):
    """Scores each (query, passage) pair of the top ``depth`` and sorts by the model's score."""

    Config = CrossEncoderConfig
    config: CrossEncoderConfig
    documents_label: ClassVar[str | None] = "reranker"

    @property
    def model(self) -> Any:
        cfg = self.config
        return self.context.shared(("cross-encoder", cfg.model, cfg.max_length), self._load)

    def _load(self) -> Any:
        from sentence_transformers import CrossEncoder

        from streamrank.models import default_device, sentence_model_path

        return CrossEncoder(
            sentence_model_path(self.config.model),
            device=self.context.device or default_device(),
            max_length=self.config.max_length,
        )

    def rerank_batch(self, rankings: Sequence[Ranking]) -> list[Ranking]:
        """Every query's (query, passage) pairs scored in one ``predict`` call."""
        self.require_documents(rankings)
        texts = [self.candidate_texts(r) for r in rankings]
        pairs = [(r.query.text, t) for r, pool in zip(rankings, texts, strict=True) for t in pool]
        if not pairs:
            return list(rankings)
        started = time.perf_counter()
        scores = self.model.predict(pairs, batch_size=self.config.batch_size, show_progress_bar=False)
        seconds_per_pair = (time.perf_counter() - started) / len(pairs)
        out, start = [], 0
        for ranking, pool in zip(rankings, texts, strict=True):
            own = [float(s) for s in scores[start : start + len(pool)]]
            start += len(pool)
            ranked = self.merge_reranked(ranking, own)
            if pool:
                ranked.calls = list(ranking.calls)  # the call goes on the output; the input is left as it was
                self.record_call(
                    ranked, self.config.model, seconds=seconds_per_pair * len(pool), note=f"{len(pool)} pairs"
                )
            out.append(ranked)
        return out
