"""Pointwise reranking with a sentence-transformers ``CrossEncoder`` (query, passage) -> score.

No cross-encoder ships offline: configure ``model`` with a Hugging Face id (when online) or a local
folder. The top ``depth`` are rescored; the rest follow in their incoming order
(``rankers.llm.merge_reranked``, shared by every reranker). ``pool_texts`` (the text of the top
``depth``, filled from the store) is shared with the E2Rank stage.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from pydantic import Field

from streamrank.rankers.llm import merge_reranked
from streamrank.stage import BaseStage, StageConfig
from streamrank.types import ModelCall, Ranking

if TYPE_CHECKING:
    from streamrank.context import PipelineContext


def pool_texts(context: PipelineContext, rankings: Sequence[Ranking], depth: int) -> list[list[str]]:
    """The ``contents`` of each ranking's top ``depth`` candidates, filled from the store if needed."""
    context.require_documents(rankings, depth, "reranker")
    return [[c.document.contents for c in r.candidates[:depth]] for r in rankings]  # type: ignore[union-attr]


class CrossEncoderConfig(StageConfig):
    model: str
    """Hugging Face id or local folder of a sentence-transformers CrossEncoder."""
    depth: int = Field(100, ge=1)
    """How many of the incoming candidates are scored (the rest follow in their incoming order)."""
    batch_size: int = Field(32, ge=1)
    max_length: int | None = None
    """Token limit per (query, passage) pair; None keeps the model's own."""


class CrossEncoderReranker(BaseStage):
    """Scores each (query, passage) pair of the top ``depth`` and sorts by the model's score."""

    Config = CrossEncoderConfig
    config: CrossEncoderConfig

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

    def run(self, rankings: Sequence[Ranking]) -> list[Ranking]:
        texts = pool_texts(self.context, rankings, self.config.depth)
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
            ranked = merge_reranked(ranking, self.name, own, self.config.depth, self.config.k)
            if pool:
                ranked.calls = [
                    *ranking.calls,
                    ModelCall(
                        self.name,
                        self.config.model,
                        seconds=seconds_per_pair * len(pool),
                        note=f"{len(pool)} pairs",
                    ),
                ]
            out.append(ranked)
        return out
