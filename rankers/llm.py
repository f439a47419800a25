"""Base of the LLM rerankers (FIRST, generative listwise, groupwise, query likelihood).

What they share on top of :class:`~streamrank.rankers.base.Reranker`: the ``[stages.llm]`` settings,
the pipeline-wide causal LM (:mod:`streamrank.rankers.causal_lm`), the prompt builder
(:mod:`streamrank.rankers.prompts`) and the query's cached instruction + query prefix
(:mod:`streamrank.rankers.kv`). Those modules never import this one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from pydantic import Field, field_validator

from streamrank.errors import ConfigError
from streamrank.rankers.base import Reranker
from streamrank.rankers.causal_lm import CausalLM
from streamrank.rankers.causal_lm_loading import LLMSettings, shared_llm
from streamrank.rankers.kv import PrefixCache
from streamrank.rankers.prompts import DEFAULT_TEMPLATE, PromptBuilder, template_data
from streamrank.stage import StageConfig
from streamrank.types import Ranking


class LLMRerankerConfig(StageConfig):
    """Options shared by the LLM rerankers."""

    depth: int = Field(20, ge=1)
    """How many of the incoming candidates are reranked; the rest keep their order below them."""
    llm: LLMSettings = Field(default_factory=LLMSettings)
    template: str | None = None
    """Prompt template (a file stem under ``rankers/templates``); None: the stage's published default."""
    context_size: int | None = Field(None, ge=64)
    """Tokens a prompt may take; None: the template's (rank_llm's 4096 for the published ones), capped by
    the model's context."""

    @field_validator("template")
    @classmethod
    def _known_template(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                template_data(value)
            except ConfigError as exc:
                raise ValueError(str(exc)) from None
        return value


class LLMReranker(Reranker):
    """Base of the LLM rerankers: shared model, documents attached, top ``depth`` rescored."""

    Config: ClassVar[type[StageConfig]] = LLMRerankerConfig
    config: LLMRerankerConfig
    call_seconds_digits: ClassVar[int | None] = 6
    default_template: ClassVar[str] = DEFAULT_TEMPLATE
    """The template used when the config names none (the method's published one)."""

    @property
    def llm(self) -> CausalLM:
        """The pipeline-wide model for these settings (loaded on first use)."""
        return shared_llm(self.context, self.config.llm)

    @property
    def builder(self) -> PromptBuilder:
        """The prompt builder for this stage's model and settings (shared by stages that match)."""
        cfg = self.config
        template = cfg.template or self.default_template
        key = ("prompt-builder", cfg.llm.model_dump_json(), template, cfg.context_size)
        return self.context.shared(
            key, lambda: PromptBuilder(self.llm, cfg.llm, template, context_size=cfg.context_size)
        )

    def listwise_prefix(self, ranking: Ranking, ids: Sequence[int]) -> PrefixCache:
        """The KV cache of a prompt's instruction + query prefix ``ids``; its computation is a recorded call."""
        prefix = PrefixCache(self.llm, ids)
        self.record_call(
            ranking,
            self.llm.name,
            prompt_tokens=prefix.computed_tokens,
            seconds=prefix.seconds,
            note="prefix cache: instruction + query",
        )
        return prefix
