"""Generative listwise reranking (RankGPT / RankZephyr): the model writes "[B] > [A] > ...".

Default prompt: RankZephyr's (``template = "rank_zephyr"``, numeric identifiers); ``"rankgpt"`` is rank_llm's
multi-turn RankGPT prompt. Same prompt machinery (:mod:`streamrank.rankers.prompts`), windows and prefix reuse as the single-token
ranker, so the two differ only in how a window is read: greedy decoding of the whole permutation
here, one forward pass there. The answer is parsed and repaired: unknown and repeated identifiers
are dropped, missing ones appended in their incoming order; repairs are noted on the ranking.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from pydantic import Field

from streamrank.rankers.listwise import ListwiseConfig, ListwiseReranker
from streamrank.rankers.prompts import ListwisePrompt
from streamrank.stage import StageConfig
from streamrank.types import Ranking

if TYPE_CHECKING:
    from streamrank.rankers.kv import PrefixCache

_IDENTIFIER = re.compile(r"\[\s*([A-Za-z0-9]{1,3})\s*\]")
TOKENS_PER_IDENTIFIER = 4
"""'A', ']', ' >', ' [' : what one identifier of the answer costs with SmolLM2's tokenizer."""


@dataclass(frozen=True)
class ParsedPermutation:
    """A repaired permutation and what had to be repaired."""

    order: list[int]
    parsed: int
    unknown: int
    repeated: int
    missing: int

    @property
    def repaired(self) -> bool:
        return bool(self.unknown or self.repeated or self.missing)


def parse_permutation(text: str, labels: Sequence[str]) -> ParsedPermutation:
    """Read "[B] > [A] > ..." into indices of ``labels``; drop unknown/repeated, append missing in order."""
    index = {label: i for i, label in enumerate(labels)}
    order: list[int] = []
    unknown = repeated = 0
    found = _IDENTIFIER.findall(text)
    for label in found:
        if label not in index:
            unknown += 1
        elif index[label] in order:
            repeated += 1
        else:
            order.append(index[label])
    placed = set(order)
    missing = [i for i in range(len(labels)) if i not in placed]
    return ParsedPermutation(order + missing, len(found), unknown, repeated, len(missing))


class GenerativeConfig(ListwiseConfig):
    max_new_tokens: int | None = Field(None, ge=1)
    """Default: enough for the whole permutation (4 tokens per identifier + 4)."""


class GenerativeListwise(ListwiseReranker):
    """Greedy-decodes the permutation of each window and parses it."""

    Config: ClassVar[type[StageConfig]] = GenerativeConfig
    config: GenerativeConfig
    answer_reserve: ClassVar[int] = TOKENS_PER_IDENTIFIER
    single_token_labels: ClassVar[bool] = False
    default_template: ClassVar[str] = "rank_zephyr"

    def rank_window(
        self, ranking: Ranking, prompt: ListwisePrompt, prefix: PrefixCache | None, span: tuple[int, int]
    ) -> list[int]:
        budget = self.config.max_new_tokens or TOKENS_PER_IDENTIFIER * len(prompt.labels) + 4
        sequence = list(prompt.body) if prefix is not None else list(prompt.ids)
        generation = self.llm.generate_greedy(sequence, budget, prefix=prefix)
        opener = self.builder.template.answer_opener
        parsed = parse_permutation(opener + generation.text, prompt.labels)
        note = (
            f"window {span[0]}-{span[1]}: {len(prompt.labels)} passages, generated {parsed.parsed} identifiers"
            + (
                f" (repaired: {parsed.unknown} unknown, {parsed.repeated} repeated, {parsed.missing} missing)"
                if parsed.repaired
                else ""
            )
        )
        if parsed.repaired:
            ranking.notes.append(f"{self.name}: {note}")
        self.record_call(
            ranking,
            self.llm.name,
            prompt_tokens=generation.prompt_tokens,
            output_tokens=generation.output_tokens,
            seconds=generation.seconds,
            note=note,
        )
        return parsed.order
