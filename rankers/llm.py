"""Base of the LLM rerankers (FIRST, generative listwise, groupwise, query likelihood).

What they share on top of :class:`~streamrank.rankers.base.Reranker`: the ``[stages.llm]`` settings,
the pipeline-wide causal LM (:mod:`streamrank.rankers.causal_lm`), the prompt builder
(:mod:`streamrank.rankers.prompts`) and the query's cached instruction + query prefix
(:mod:`streamrank.rankers.kv`). Those modules never import this one.
"""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from streamrank.rankers.base import Reranker
from streamrank.rankers.causal_lm import CausalLM
from streamrank.rankers.causal_lm_loading import LLMSettings, shared_llm
from streamrank.rankers.kv import PrefixCache
from streamrank.rankers.prompts import PromptBuilder
from streamrank.stage import StageConfig
from streamrank.types import Ranking


class LLMRerankerConfig(StageConfig):
    """Options shared by the LLM rerankers."""

    depth: int = Field(20, ge=1)
    """How many of the incoming candidates are reranked; the rest keep their order below them."""
    llm: LLMSettings = Field(default_factory=LLMSettings)


class LLMReranker(Reranker):
    """Base of the LLM rerankers: shared model, documents attached, top ``depth`` rescored."""

    Config: ClassVar[type[StageConfig]] = LLMRerankerConfig
    config: LLMRerankerConfig
    call_seconds_digits: ClassVar[int | None] = 6

    @property
    def llm(self) -> CausalLM:
        """The pipeline-wide model for these settings (loaded on first use)."""
        return shared_llm(self.context, self.config.llm)

    @property
    def builder(self) -> PromptBuilder:
        """The prompt builder for this stage's model and settings (shared by stages that match)."""
        key = ("prompt-builder", self.config.llm.model_dump_json())
        return self.context.shared(key, lambda: PromptBuilder(self.llm, self.config.llm))

    def listwise_prefix(self, ranking: Ranking, query: str) -> PrefixCache:
        """The KV cache of the query's instruction + query prefix; its computation is a recorded call."""
        prefix = PrefixCache(self.llm, self.builder.listwise_prefix(query))
        self.record_call(
            ranking,
            self.llm.name,
            prompt_tokens=prefix.computed_tokens,
            seconds=prefix.seconds,
            note="prefix cache: instruction + query",
        )
        return prefix
