"""Prompts of the LLM rerankers, built in one place from separately tokenized parts.

A listwise prompt (FIRST, generative listwise, groupwise) is three parts, tokenized separately and
concatenated as ids, so the cached-prefix path and the full path see the very same ids:

    prefix  chat head + instruction + query                       shared by every window of a query
    body    "[A] passage\\n" ... "Search Query: ... Rank ..."      per window / group
            + chat tail (assistant header) + "["

Every part boundary falls where the tokenizer splits anyway (after a single "\\n", before "["; no part
ends in a run of newlines, which a byte-level BPE would split differently inside the whole string),
so for untruncated passages the concatenated ids equal the tokenization of the whole prompt string
(tested).
The prompt ends with the opening "[" of the assistant's answer, so the next token is the first
identifier: identifiers are chosen as single tokens that also stay one token between brackets
(A..Z, then two-letter tokens AA, AB, ...), checked one by one. Passages are cut to a token budget;
the instruction, the query and the template tail never are.
"""

from __future__ import annotations

import itertools
import string
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from streamrank.errors import RankerError

if TYPE_CHECKING:
    from streamrank.rankers.causal_lm import CausalLM
    from streamrank.rankers.causal_lm_loading import LLMSettings

SYSTEM = (
    "You are RankGPT, an intelligent assistant that can rank passages based on their relevancy to the query."
)
PREFIX = (
    "I will provide you with passages, each indicated by an identifier in square brackets. "
    "Rank the passages based on their relevance to the search query: {query}.\n"
)
CLOSING = (
    "Search Query: {query}.\nRank the {n} passages above based on their relevance to the search query. "
    "All the passages should be included and listed using identifiers, in descending order of relevance. "
    "The output format should be [] > [], e.g., {example}. "
    "Only respond with the ranking results, do not say any word or explain."
)
QLM_INSTRUCTION = "Please write a question based on this passage."
OPENER = "["
MIN_PASSAGE_TOKENS = 8
LABEL_OVERHEAD = 4
"""Tokens per passage besides its text: "[", identifier, "]", newline."""


@dataclass(frozen=True)
class ListwisePrompt:
    """Token ids of one listwise prompt plus the identifier token of each passage, in order."""

    prefix: tuple[int, ...]
    body: tuple[int, ...]
    labels: tuple[str, ...]
    label_ids: tuple[int, ...]
    passage_tokens: int
    """The per-passage token cap actually used (may be below the configured one in full-list mode)."""

    @property
    def ids(self) -> tuple[int, ...]:
        return self.prefix + self.body


def clean(text: str) -> str:
    """Collapse whitespace (so no newline run can merge with the separators around a passage)."""
    return " ".join(text.split())


def label_candidates() -> Iterator[str]:
    """Identifier strings in preference order: A..Z, AA..ZZ, a..z, 0..9."""
    yield from string.ascii_uppercase
    yield from ("".join(p) for p in itertools.product(string.ascii_uppercase, repeat=2))
    yield from string.ascii_lowercase
    yield from string.digits


class PromptBuilder:
    """Builds the rerankers' prompts for one model and one set of LLM settings."""

    def __init__(self, llm: CausalLM, settings: LLMSettings) -> None:
        self.llm = llm
        self.settings = settings
        self._labels: tuple[tuple[str, ...], tuple[int, ...]] | None = None
        self._bracket = self._single(OPENER), self._single("]")

    def _single(self, text: str) -> int:
        ids = self.llm.encode(text)
        if len(ids) != 1:
            raise RankerError(
                f"{self.llm.name}: {text!r} is not a single token ({ids}); listwise prompts need it"
            )
        return ids[0]

    # ---- identifiers -----------------------------------------------------------------------
    def labels(self, n: int) -> tuple[tuple[str, ...], tuple[int, ...]]:
        """``n`` distinct identifiers that are each ONE token, also right after "[" (RankerError if not)."""
        if self._labels is None:
            opener, closer = self._bracket
            names: list[str] = []
            ids: list[int] = []
            for name in label_candidates():
                tokens = self.llm.encode(name)
                if (
                    len(tokens) == 1
                    and tokens[0] not in ids
                    and self.llm.encode(f"[{name}]") == [opener, tokens[0], closer]
                ):
                    names.append(name)
                    ids.append(tokens[0])
            self._labels = tuple(names), tuple(ids)
        names_all, ids_all = self._labels
        if n > len(names_all):
            raise RankerError(
                f"{self.llm.name}: only {len(names_all)} single-token identifiers are available, {n} needed; "
                "use a smaller window"
            )
        return names_all[:n], ids_all[:n]

    # ---- text parts ------------------------------------------------------------------------
    def query_text(self, query: str) -> str:
        """The query, cut to ``max_query_tokens`` tokens."""
        text = clean(query)
        ids = self.llm.encode(text)
        return (
            text
            if len(ids) <= self.settings.max_query_tokens
            else self.llm.decode(ids[: self.settings.max_query_tokens])
        )

    def passage_ids(self, text: str, cap: int | None = None) -> list[int]:
        """A passage's ids (with its leading space), cut to ``cap`` (default ``max_passage_tokens``)."""
        text = clean(text)
        if not text:
            return []
        return self.llm.encode(" " + text)[: cap or self.settings.max_passage_tokens]

    def listwise_prefix(self, query: str) -> list[int]:
        """Chat head + instruction + query: the part shared by every window/group of a query."""
        head, _ = self.llm.chat_frame(SYSTEM)
        return self.llm.encode(head + PREFIX.format(query=self.query_text(query)))

    def listwise_tail(self, query: str, labels: Sequence[str]) -> list[int]:
        """Closing instruction + chat tail + the answer's opening "[" (never truncated)."""
        _, tail = self.llm.chat_frame(SYSTEM)
        example = " > ".join(f"[{label}]" for label in labels[:2])
        text = CLOSING.format(query=self.query_text(query), n=len(labels), example=example) + tail + OPENER
        ids = self.llm.encode(text)
        if ids[-1] != self._bracket[0]:
            raise RankerError(
                f"{self.llm.name}: the prompt's last token is {ids[-1]}, not the opening '[' of the answer; "
                "the identifier would not be the next token"
            )
        return ids

    def listwise(
        self, query: str, passages: Sequence[str], *, reserve: int = 0, fit: bool = False
    ) -> ListwisePrompt:
        """The listwise prompt over ``passages``, labelled [A], [B], ...

        ``reserve`` tokens are kept free for the answer. If the prompt would not fit the model's
        context: with ``fit`` the per-passage cap is lowered uniformly (never below
        MIN_PASSAGE_TOKENS), otherwise RankerError.
        """
        labels, label_ids = self.labels(len(passages))
        prefix = self.listwise_prefix(query)
        tail = self.listwise_tail(query, labels)
        cap = self.settings.max_passage_tokens
        room = self.llm.context_length - reserve - len(prefix) - len(tail)
        needed = len(passages) * (cap + LABEL_OVERHEAD)
        if needed > room:
            fitted = room // max(len(passages), 1) - LABEL_OVERHEAD
            if not fit or fitted < MIN_PASSAGE_TOKENS:
                raise RankerError(
                    f"{self.llm.name}: {len(passages)} passages of up to {cap} tokens do not fit the context of "
                    f"{self.llm.context_length} tokens; use sliding windows or lower max_passage_tokens"
                )
            cap = fitted
        opener, closer = self._bracket
        newline = self.llm.encode("\n")
        body: list[int] = []
        for label_id, text in zip(label_ids, passages, strict=True):
            body += [opener, label_id, closer, *self.passage_ids(text, cap), *newline]
        body += tail
        return ListwisePrompt(tuple(prefix), tuple(body), labels, label_ids, cap)

    def query_likelihood(
        self, query: str, passage: str, *, chat: bool = False
    ) -> tuple[list[int], list[int]]:
        """(prompt ids, query ids) for UPR-style scoring: log p(query | "Passage: ... Question:")."""
        query_text = self.query_text(query)
        passage_ids = self.passage_ids(passage)
        if chat:
            head, tail = self.llm.chat_frame(None)
            lead, trail, target = head + "Passage:", f"\n{QLM_INSTRUCTION}" + tail, query_text
        else:
            lead, trail, target = "Passage:", f"\n{QLM_INSTRUCTION}\nQuestion:", " " + query_text
        prompt = self.llm.encode(lead) + passage_ids + self.llm.encode(trail)
        return prompt, self.llm.encode(target)
