"""Pointwise reranking by query likelihood (UPR, Sachan et al. 2022) under a causal LM.

score(passage) = mean log p(query token | "Passage: <passage>\\nPlease write a question based on
this passage.\\nQuestion:", earlier query tokens), from full-vocabulary log-softmax. Pairs are run in
batches, left-padded so every row's query sits at the end of the batch and one slice of the logits
serves all rows.
"""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from streamrank.rankers.llm import LLMReranker, LLMRerankerConfig
from streamrank.stage import StageConfig
from streamrank.types import Ranking


class QueryLikelihoodConfig(LLMRerankerConfig):
    batch_size: int = Field(8, ge=1)
    chat_template: bool = False
    """Wrap the passage in the chat template (the query is then the assistant's answer)."""


class QueryLikelihood(LLMReranker):
    """UPR-style query likelihood; higher mean log-probability of the query ranks higher."""

    Config: ClassVar[type[StageConfig]] = QueryLikelihoodConfig
    config: QueryLikelihoodConfig

    def score_top(self, ranking: Ranking, texts: list[str]) -> list[float]:
        return self.score_texts(ranking, ranking.query.text, texts)

    def score_texts(self, ranking: Ranking, query: str, texts: list[str]) -> list[float]:
        """Mean query log-probability for each passage; model calls recorded on ``ranking``."""
        import torch

        pairs = [self.builder.query_likelihood(query, text, chat=self.config.chat_template) for text in texts]
        scores = [0.0] * len(texts)
        by_length = sorted(range(len(pairs)), key=lambda i: len(pairs[i][0]))
        size = self.config.batch_size
        for start in range(0, len(by_length), size):
            batch = by_length[start : start + size]
            sequences = [pairs[i][0] + pairs[i][1] for i in batch]
            # position p predicts token p + 1: the query's tokens are predicted from the prompt's last
            # position up to the one before the query's last token
            positions = [
                list(range(len(pairs[i][0]) - 1, len(sequences[j]) - 1)) for j, i in enumerate(batch)
            ]
            result = self.llm.logits_at(sequences, positions, padding="left")
            for row, i in zip(result.rows, batch, strict=True):
                target = torch.tensor(pairs[i][1], device=row.device)
                logprobs = torch.log_softmax(row, dim=-1).gather(1, target[:, None]).squeeze(1)
                scores[i] = float(logprobs.mean())
            self.record_call(
                ranking,
                self.llm.name,
                prompt_tokens=result.computed_tokens,
                seconds=result.seconds,
                note=f"query likelihood of {len(batch)} passages",
            )
        return scores
