"""Prompts of the LLM rerankers: published templates as data, rendered and tokenized in one place.

A listwise template (``rankers/templates/<name>.toml``: FIRST's ``first``, ``rank_zephyr``, ``rankgpt``, this
project's ``streamrank``) names its source and holds the published text: system message, prefix, one body
line per passage, suffix (single turn), or the same as user/assistant turns (``turns = "multi"``, RankGPT).
A prompt is rendered as the source renders it: the messages through the model's chat template (generation
prompt added), ``ftfy.fix_text`` over the whole text where the source does that, then tokenized ONCE as a
whole string, special tokens added as the source's tokenizer call adds them. The ids are therefore the
source's ids, token for token (tests/rankers/test_published_prompts.py checks this against rank_llm).

The ids are then split where the text splits:

    prefix  chat head + instruction + query                  shared by every window of a query (KV-cached)
    body    the passages ... suffix + chat tail + "["        per window / group

(the prefix is every token that ends before the first passage's identifier line), and each identifier's
token is found by its character offsets, so "identifiers are single tokens" is checked in context. A template
with ``answer_opener = "["`` ends with the answer's opening "[", so the next token is the first identifier.

Truncation never touches the instruction, the query or the template tail, only passages: ``passages =
"words"`` is rank_llm's rule (whole words, ``max_words * 20 / window``, lowered until the prompt fits
``context_size`` less the answer's tokens); ``passages = "tokens"`` is this project's (``max_passage_tokens``
tokens each, lowered uniformly to fit in full-list mode).
"""

from __future__ import annotations

import functools
import itertools
import re
import string
import tomllib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from streamrank.errors import ConfigError, RankerError

if TYPE_CHECKING:
    from streamrank.rankers.causal_lm import CausalLM
    from streamrank.rankers.causal_lm_loading import LLMSettings

TEMPLATES = Path(__file__).resolve().parent / "templates"
DEFAULT_TEMPLATE = "streamrank"
QLM_INSTRUCTION = "Please write a question based on this passage."
OPENER = "["
MIN_PASSAGE_TOKENS = 8
RANK_LLM_WINDOW = 20
"""rank_llm scales the per-passage word limit by ``RANK_LLM_WINDOW / window``."""
_NUMBER_REF = re.compile(r"\[(\d+)\]")


# ---- templates -------------------------------------------------------------------------------------
def template_names() -> list[str]:
    """Names of the packaged templates (file stems under ``rankers/templates``)."""
    return sorted(p.stem for p in TEMPLATES.glob("*.toml"))


@functools.cache
def template_data(name: str) -> dict[str, Any]:
    """The raw table of template ``name`` (ConfigError naming the known ones if there is none)."""
    path = TEMPLATES / f"{name}.toml"
    if not path.is_file():
        raise ConfigError(f"unknown prompt template {name!r}; known: {', '.join(template_names())}")
    return tomllib.loads(path.read_text()) | {"name": name}


@dataclass(frozen=True)
class ListwiseTemplate:
    """A listwise prompt recipe (see the module docstring and the template files' comments)."""

    name: str
    source: str
    system: str
    prefix: str
    body: str
    suffix: str
    turns: Literal["single", "multi"] = "single"
    prefix_assistant: str = ""
    body_assistant: str = ""
    identifiers: Literal["alpha", "numeric", "single_token"] = "alpha"
    """``alpha``: A, B, C, ... (rank_llm's ``use_alpha``; each checked to be one token inside the prompt);
    ``numeric``: 1, 2, 3, ...; ``single_token``: alphabetical names filtered to those that are single tokens
    on their own and between brackets (A..Z, then AA, AB, ...; this project's template)."""
    answer_opener: str = OPENER
    passages: Literal["words", "tokens"] = "tokens"
    max_words: int = 300
    context_size: int | None = None
    fix_text: bool = False
    replace_numbers: bool = False


def listwise_template(template: str | ListwiseTemplate) -> ListwiseTemplate:
    """The listwise template ``template`` names (ConfigError if unknown or not a listwise one)."""
    if isinstance(template, ListwiseTemplate):
        return template
    data = dict(template_data(template))
    if data.pop("kind", None) != "listwise":
        raise ConfigError(f"prompt template {template!r} is not a listwise template")
    known = {f.name for f in fields(ListwiseTemplate)}
    unknown = set(data) - known
    if unknown:
        raise ConfigError(f"prompt template {template!r}: unknown keys {sorted(unknown)}")
    return ListwiseTemplate(**data)


# ---- text helpers ----------------------------------------------------------------------------------
def clean(text: str) -> str:
    """Collapse whitespace (so no newline run can merge with the separators around a passage)."""
    return " ".join(text.split())


def replace_numbers(text: str) -> str:
    """rank_llm's ``_replace_number``: "[3]" in a text becomes "(3)" so it cannot pass for an identifier."""
    return _NUMBER_REF.sub(r"(\1)", text)


def fix_text(text: str) -> str:
    """``ftfy.fix_text`` (mojibake, curly quotes, HTML entities), as rank_llm applies it."""
    import ftfy

    return ftfy.fix_text(text)


def label_candidates() -> Iterator[str]:
    """Alphabetical identifier strings in preference order: A..Z, AA..ZZ, a..z, 0..9."""
    yield from string.ascii_uppercase
    yield from ("".join(p) for p in itertools.product(string.ascii_uppercase, repeat=2))
    yield from string.ascii_lowercase
    yield from string.digits


@dataclass(frozen=True)
class ListwisePrompt:
    """Token ids of one listwise prompt plus the identifier token of each passage, in order."""

    prefix: tuple[int, ...]
    body: tuple[int, ...]
    labels: tuple[str, ...]
    label_ids: tuple[int, ...]
    passage_tokens: int
    """The per-passage limit actually used (tokens, or words for ``passages = "words"``)."""
    text: str = ""
    """The whole prompt as text (chat template applied)."""
    cut: bool = False
    """Whether passages were cut below the configured limit to fit the context."""
    opened_ids: tuple[int, ...] = ()
    """Per identifier, the one token that is the answer's opener and the identifier together ("[A" on a
    byte-level BPE vocabulary), or -1 where the tokenizer splits them; empty when it splits them all."""

    @property
    def ids(self) -> tuple[int, ...]:
        return self.prefix + self.body


class PromptBuilder:
    """Builds the rerankers' prompts for one model, one set of LLM settings and one listwise template."""

    def __init__(
        self,
        llm: CausalLM,
        settings: LLMSettings,
        template: str | ListwiseTemplate = DEFAULT_TEMPLATE,
        context_size: int | None = None,
    ) -> None:
        self.llm = llm
        self.settings = settings
        self.template = listwise_template(template)
        self.context_size = min(
            context_size or self.template.context_size or llm.context_length, llm.context_length
        )
        """Tokens a prompt may take (the template's ``context_size``, never more than the model's)."""
        self._labels: tuple[tuple[str, ...], tuple[int, ...]] | None = None

    def _single(self, text: str) -> int:
        ids = self.llm.encode(text)
        if len(ids) != 1:
            raise RankerError(
                f"{self.llm.name}: {text!r} is not a single token ({ids}); listwise prompts need it"
            )
        return ids[0]

    # ---- identifiers -----------------------------------------------------------------------
    def labels(self, n: int) -> tuple[tuple[str, ...], tuple[int, ...]]:
        """``n`` distinct alphabetical identifiers that are each ONE token, also between brackets."""
        if self._labels is None:
            opener, closer = self._single(OPENER), self._single("]")
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

    def identifier_names(self, n: int) -> tuple[str, ...]:
        """The template's identifiers for ``n`` passages: A, B, ... or 1, 2, ..."""
        if self.template.identifiers == "numeric":
            return tuple(str(i) for i in range(1, n + 1))
        if self.template.identifiers == "alpha":  # checked in context by build() (a SentencePiece tokenizer
            return tuple(itertools.islice(label_candidates(), n))  # splits "[" alone into "▁" + "[")
        return self.labels(n)[0]

    def answer_tokens(self, labels: Sequence[str]) -> int:
        """rank_llm's estimate of the answer's length: "[A] > [B] > ..." tokenized, less one."""
        text = " > ".join(f"[{label}]" for label in labels)
        return len(self.llm.tokenizer.encode(text)) - 1

    # ---- text parts ------------------------------------------------------------------------
    def query_text(self, query: str) -> str:
        """The query as the template puts it in (``tokens``: cut to ``max_query_tokens``)."""
        if self.template.passages == "words":
            return replace_numbers(query) if self.template.replace_numbers else query
        text = clean(query)
        ids = self.llm.encode(text)
        cap = self.settings.max_query_tokens
        return text if len(ids) <= cap else self.llm.decode(ids[:cap])

    def passage_ids(self, text: str, cap: int | None = None) -> list[int]:
        """A passage's ids (with its leading space), cut to ``cap`` (default ``max_passage_tokens``)."""
        text = clean(text)
        if not text:
            return []
        return self.llm.encode(" " + text)[: cap or self.settings.max_passage_tokens]

    def passage_text(self, text: str, limit: float) -> str:
        """A passage as the template puts it in, cut to ``limit`` words or tokens."""
        t = self.template
        if t.passages == "words":  # rank_llm's _convert_doc_to_prompt_content
            content = text.strip()
            if t.fix_text:
                content = fix_text(content)
            content = " ".join(content.split()[: int(limit)])
            return replace_numbers(content) if t.replace_numbers else content
        ids = self.passage_ids(text, int(limit))
        return self.llm.decode(ids).strip() if ids else ""

    def messages(self, query: str, contents: Sequence[str], labels: Sequence[str]) -> list[dict[str, str]]:
        """The chat messages of one window, as the source's inference handler builds them."""
        t = self.template
        values = {
            "num": len(contents),
            "query": query,
            "example": " > ".join(f"[{label}]" for label in labels[:2]),
        }
        out = [{"role": "system", "content": t.system}] if t.system else []
        prefix, suffix = t.prefix.format(**values), t.suffix.format(**values)
        bodies = [t.body.format(rank=r, candidate=c) for r, c in zip(labels, contents, strict=True)]
        if t.turns == "single":
            return [*out, {"role": "user", "content": prefix + "".join(bodies) + suffix}]
        out += [{"role": "user", "content": prefix}, {"role": "assistant", "content": t.prefix_assistant}]
        for label, body in zip(labels, bodies, strict=True):
            out += [{"role": "user", "content": body}]
            out += [{"role": "assistant", "content": t.body_assistant.format(rank=label)}]
        return [*out, {"role": "user", "content": suffix}]

    def render(self, messages: list[dict[str, str]]) -> str:
        """The messages through the model's chat template (generation prompt added), fixed, plus the opener."""
        tokenizer = self.llm.tokenizer
        if getattr(tokenizer, "chat_template", None):
            try:
                text = tokenizer.apply_chat_template(
                    messages, tokenize=False, add_generation_prompt=True, enable_thinking=False
                )
            except Exception:  # templates without a system role (Gemma): fold it into the first user turn
                system = [m["content"] for m in messages if m["role"] == "system"]
                rest = [dict(m) for m in messages if m["role"] != "system"]
                if system:
                    rest[0]["content"] = f"{system[0]}\n\n{rest[0]['content']}"
                text = tokenizer.apply_chat_template(
                    rest, tokenize=False, add_generation_prompt=True, enable_thinking=False
                )
        else:
            head = [m["content"] + "\n\n" for m in messages if m["role"] == "system"]
            text = "".join(head) + "\n".join(m["content"] for m in messages if m["role"] != "system") + "\n"
        if self.template.fix_text:
            text = fix_text(text)
        return text + self.template.answer_opener

    def tokenize(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids and character offsets of the whole prompt; the tokenizer's special tokens (BOS) are added
        as the source's ``tokenizer.encode(prompt)`` adds them, unless the chat template wrote them already."""
        tokenizer = self.llm.tokenizer
        bos = getattr(tokenizer, "bos_token", None)
        special = not (bos and text.startswith(bos))
        enc = tokenizer(text, add_special_tokens=special, return_offsets_mapping=True)
        return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]

    def bare_token(self, label: str) -> int | None:
        """The vocabulary token that is exactly ``label`` (no leading-space marker), or None.

        A byte-level BPE tokenizer (Qwen, Llama 3) merges "[A" into one token inside the prompt; after the
        prompt's closing "[" the model's next token is then the bare "A", the single-character token that
        rank_llm's ``_evaluate_logits`` reads."""
        tokenizer = self.llm.tokenizer
        token_id = tokenizer.convert_tokens_to_ids(label)
        if not isinstance(token_id, int) or token_id == getattr(tokenizer, "unk_token_id", None):
            return None
        return token_id if tokenizer.decode([token_id]) == label else None

    # ---- whole prompts ---------------------------------------------------------------------
    def build(
        self, query: str, contents: Sequence[str], labels: Sequence[str], *, single_token: bool = True
    ) -> ListwisePrompt:
        """The prompt over already prepared passage ``contents`` (no truncation here)."""
        t = self.template
        text = self.render(self.messages(query, contents, labels))
        ids, offsets = self.tokenize(text)
        # the passages are searched for in order after the multi-turn prefix's assistant reply (single turn:
        # from the start; no identifier line can occur in the system message or the instruction)
        anchor = t.prefix_assistant if t.turns == "multi" else ""
        start = max(text.find(anchor), 0) + len(anchor) if anchor else 0
        before_rank = t.body.split("{rank}")[0]
        label_spans: list[tuple[int, int]] = []
        boundary = None
        for number, (label, content) in enumerate(zip(labels, contents, strict=True)):
            line = t.body.format(rank=label, candidate=content)
            at = text.find(line, start)
            if at < 0:
                raise RankerError(
                    f"{self.llm.name}: passage {number + 1} is not verbatim in the rendered prompt "
                    "(the chat template or text cleaning changed it); cannot locate its identifier"
                )
            boundary = at if boundary is None else boundary
            label_spans.append((at + len(before_rank), at + len(before_rank) + len(label)))
            start = at + len(line)
        cut = (
            len(ids)
            if boundary is None
            else next(
                (i for i, (s, e) in enumerate(offsets) if e > boundary or (s >= boundary and e > s)), len(ids)
            )
        )
        by_span = {span: i for i, span in enumerate(offsets)}
        label_ids, opened_ids = [], []
        opener = t.answer_opener if t.answer_opener and before_rank.endswith(t.answer_opener) else ""
        for label, span in zip(labels, label_spans, strict=True):
            index = by_span.get(span)
            merged = by_span.get((span[0] - len(opener), span[1])) if opener else None
            opened_ids.append(-1 if merged is None else ids[merged])
            label_id = ids[index] if index is not None else self.bare_token(label)
            if label_id is None and single_token:
                raise RankerError(
                    f"{self.llm.name}: identifier [{label}] is not one token, inside the prompt or on its "
                    "own; the template's identifiers do not suit this tokenizer"
                )
            label_ids.append(-1 if label_id is None else label_id)
        if t.answer_opener and offsets[-1] != (len(text) - len(t.answer_opener), len(text)):
            raise RankerError(
                f"{self.llm.name}: the prompt's last token is {ids[-1]}, not the answer's opening "
                f"{t.answer_opener!r}; the identifier would not be the next token"
            )
        opened = tuple(opened_ids) if any(i >= 0 for i in opened_ids) else ()
        return ListwisePrompt(
            tuple(ids[:cut]), tuple(ids[cut:]), tuple(labels), tuple(label_ids), 0, text, opened_ids=opened
        )

    def listwise(
        self,
        query: str,
        passages: Sequence[str],
        *,
        reserve: int = 0,
        fit: bool = False,
        single_token: bool = True,
    ) -> ListwisePrompt:
        """The listwise prompt over ``passages``, identifiers as the template says, cut to fit.

        ``passages = "words"``: rank_llm's fitting loop (the answer's tokens reserved as rank_llm
        estimates them). ``passages = "tokens"``: ``max_passage_tokens`` each, ``reserve`` tokens kept
        free for the answer; if that does not fit, with ``fit`` the cap is lowered uniformly (never below
        MIN_PASSAGE_TOKENS), otherwise RankerError.
        """
        n = len(passages)
        labels = self.identifier_names(n)
        q = self.query_text(query)
        opener = 1 if self.template.answer_opener else 0
        if self.template.passages == "words":
            limit = self.template.max_words * (RANK_LLM_WINDOW / max(n, 1))
            budget = self.context_size - self.answer_tokens(labels)
            while True:
                prompt = self.build(
                    q, [self.passage_text(p, limit) for p in passages], labels, single_token=single_token
                )
                excess = len(prompt.ids) - opener - budget
                if excess <= 0:
                    return _with_limit(
                        prompt,
                        int(limit),
                        int(limit) < int(self.template.max_words * RANK_LLM_WINDOW / max(n, 1)),
                    )
                limit -= max(1, excess // (n * 4))
                if int(limit) < 1:
                    raise RankerError(
                        f"{self.llm.name}: the prompt for {n} passages does not fit {self.context_size} tokens "
                        "even with one word per passage; use a smaller window"
                    )
        cap = self.settings.max_passage_tokens
        room = self.llm.context_length - reserve
        prompt = self.build(
            q, [self.passage_text(p, cap) for p in passages], labels, single_token=single_token
        )
        if len(prompt.ids) <= room:
            return _with_limit(prompt, cap, False)
        if fit:
            fixed = len(self.build(q, [""] * n, labels, single_token=single_token).ids)
            fitted = (room - fixed) // max(n, 1)
            while fitted >= MIN_PASSAGE_TOKENS:
                prompt = self.build(
                    q, [self.passage_text(p, fitted) for p in passages], labels, single_token=single_token
                )
                if len(prompt.ids) <= room:
                    return _with_limit(prompt, fitted, True)
                fitted -= max(1, (len(prompt.ids) - room) // max(n, 1))
        raise RankerError(
            f"{self.llm.name}: {n} passages of up to {cap} tokens do not fit the context of "
            f"{self.llm.context_length} tokens; use sliding windows or lower max_passage_tokens"
        )

    def listwise_prefix(self, query: str, num: int = 1) -> list[int]:
        """Chat head + instruction + query for windows of ``num`` passages: what every window shares."""
        labels = self.identifier_names(num)
        return list(self.build(self.query_text(query), ["x"] * num, labels, single_token=False).prefix)

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


def _with_limit(prompt: ListwisePrompt, limit: int, cut: bool) -> ListwisePrompt:
    from dataclasses import replace

    return replace(prompt, passage_tokens=limit, cut=cut)
