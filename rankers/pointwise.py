"""Pointwise reranking under a causal LM: query likelihood (UPR, Sachan et al. 2022) and yes/no
relevance (Qwen3-Reranker, :class:`YesNoReranker`).

Query likelihood:
score(passage) = mean log p(query token | "Passage: <passage>\\nPlease write a question based on
this passage.\\nQuestion:", earlier query tokens), from full-vocabulary log-softmax. Pairs are run in
batches, left-padded so every row's query sits at the end of the batch and one slice of the logits
serves all rows.
"""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import Field

from streamrank.errors import ConfigError, RankerError
from streamrank.rankers.llm import LLMReranker, LLMRerankerConfig
from streamrank.rankers.prompts import template_data
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


class YesNoConfig(LLMRerankerConfig):
    depth: int = Field(100, ge=1)
    batch_size: int = Field(8, ge=1)
    instruction: str | None = None
    """The task instruction in the pair text; None: the template's (the model card's default)."""
    max_length: int | None = Field(None, ge=64)
    """Token limit of one input, frame included; None: the template's (8,192)."""


class YesNoReranker(LLMReranker):
    """Pointwise yes/no reranking (Qwen3-Reranker): log p("yes") against "no" after each (query, passage) prompt.

    The prompt is the ``qwen3_reranker`` template (rankers/templates): a fixed frame (system message, user
    turn, empty think block) around ``<Instruct>: ... <Query>: ... <Document>: ...``; the pair text is cut
    from the right to fit ``max_length``, the frame never. Pairs run in left-padded batches; the two
    logits are read from the full vocabulary; constant scores raise (a wrong frame or model).
    """

    Config: ClassVar[type[StageConfig]] = YesNoConfig
    config: YesNoConfig
    default_template: ClassVar[str] = "qwen3_reranker"

    @property
    def recipe(self) -> dict[str, Any]:
        data = template_data(self.config.template or self.default_template)
        if data.get("kind") != "pointwise":
            raise ConfigError(f"{self.name}: template {data['name']!r} is not a pointwise (yes/no) template")
        return data

    def pair_ids(self, query: str, texts: list[str]) -> list[list[int]]:
        """The model's input ids for each passage, built as the template's source builds them."""
        t, tokenizer = self.recipe, self.llm.tokenizer
        prefix = tokenizer.encode(t["prefix"], add_special_tokens=False)
        suffix = tokenizer.encode(t["suffix"], add_special_tokens=False)
        room = (self.config.max_length or t["max_length"]) - len(prefix) - len(suffix)
        instruction = self.config.instruction or t["instruction"]
        pairs = [t["pair"].format(instruction=instruction, query=query, document=text) for text in texts]
        bodies = tokenizer(pairs, padding=False, truncation="longest_first", max_length=room)["input_ids"]
        return [prefix + list(body) + suffix for body in bodies]

    def answer_ids(self) -> tuple[int, int]:
        """Token ids of the "no" and "yes" answers (RankerError if either is not one token)."""
        ids = []
        for word in (self.recipe["no"], self.recipe["yes"]):
            token = self.llm.tokenizer.convert_tokens_to_ids(word)
            if not isinstance(token, int) or token == self.llm.tokenizer.unk_token_id:
                raise RankerError(f"{self.llm.name}: {word!r} is not one token of this tokenizer")
            ids.append(token)
        return ids[0], ids[1]

    def score_top(self, ranking: Ranking, texts: list[str]) -> list[float]:
        import torch

        sequences = self.pair_ids(ranking.query.text, texts)
        answers = self.answer_ids()
        scores = [0.0] * len(texts)
        size = self.config.batch_size
        for start in range(0, len(sequences), size):
            batch = sequences[start : start + size]
            logits, result = self.llm.next_token_logits(batch, answers, padding="left")
            for i, value in enumerate(torch.log_softmax(logits.double(), dim=1)[:, 1].tolist()):
                scores[start + i] = value
            self.record_call(
                ranking,
                self.llm.name,
                prompt_tokens=result.computed_tokens,
                seconds=result.seconds,
                note=f"yes/no of {len(batch)} passages",
            )
        if len(scores) > 1 and max(scores) - min(scores) <= 1e-9:
            raise RankerError(
                f"{self.name}: yes/no scores are constant ({scores[0]:.4g}); the answer position does not "
                "hold the model's yes/no judgement (wrong frame or model)"
            )
        return scores
