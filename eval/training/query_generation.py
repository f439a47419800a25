"""Generated pseudo-queries (GPL's recipe): an instruction LLM writes a question for each document.

For a collection without train qrels, titles make poor queries for the E2Rank recipe (a title finds
its own abstract too easily: trained on them, the encoder learns title matching; BENCHMARKS.md). GPL
(Wang et al., 2022) instead asks a query generator for a question each passage answers. Here the
generator is any causal LM the LLM stages load (default: the packaged SmolLM2-135M-Instruct), greedy,
with the answer started as ``Question: What`` so that a small model writes a question rather than a
comment; what it writes is kept only if it looks like a question about the passage
(:func:`clean_question`).

Generation is slow on a CPU (about 2 s a passage for SmolLM2 on one thread), so every document's
outcome is appended to a JSONL file as it is made and a rerun continues from it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from streamrank.errors import StreamRankError
from streamrank.eval.training.examples import MIN_QUERY_WORDS, PSEUDO_MAX_WORDS, QuerySource
from streamrank.types import Document, Query

INSTRUCTION = (
    "Write a specific technical question about the subject of this text, one that the text answers.\n\nText: {passage}"
)
ANSWER_START = "Question: What"
PASSAGE_WORDS = 160
"""Words of each passage shown to the generator."""
MAX_NEW_TOKENS = 40

# A small model often asks about the text instead of its subject ("what is the purpose of this note").
_ABOUT_THE_TEXT = re.compile(
    r"\b(this|passage|abstract|article|text|note|paper|question|answer|author|authors|audience)\b", re.I
)


def clean_question(generated: str) -> str | None:
    """``What`` + the generator's continuation as a one-line question, or None if it is not one.

    Rejected: no question mark, fewer than MIN_QUERY_WORDS + 1 or more than PSEUDO_MAX_WORDS words, a
    question about the text itself, a repeated word 4-gram (a degenerate loop).
    """
    line = generated.strip().split("\n", 1)[0]
    head, mark, _ = line.partition("?")
    if not mark:
        return None
    question = " ".join(f"What {head.strip()}?".split())
    words = question.lower().split()
    if not MIN_QUERY_WORDS + 1 <= len(words) <= PSEUDO_MAX_WORDS or _ABOUT_THE_TEXT.search(question):
        return None
    grams = [tuple(words[i : i + 4]) for i in range(len(words) - 3)]
    if len(grams) != len(set(grams)):
        return None
    return question


class QuestionGenerator:
    """Writes one question per passage with a causal LM (greedy, stops after the first ``?``)."""

    def __init__(self, model: str = "smollm2", device: str = "cpu") -> None:
        from streamrank.rankers.causal_lm_loading import LLMSettings, load_causal_lm

        self.name = model
        self.lm = load_causal_lm(LLMSettings(model=model), device)
        self.head, self.tail = self.lm.chat_frame(None)
        pieces = {i: self.lm.decode([i]) for i in self.lm.tokenizer.get_vocab().values()}
        self.question_marks = frozenset(i for i, text in pieces.items() if "?" in text or "\n" in text)

    def __call__(self, document: Document) -> str:
        passage = " ".join(document.contents.split()[:PASSAGE_WORDS])
        prompt = self.head + INSTRUCTION.format(passage=passage) + self.tail + ANSWER_START
        out = self.lm.generate_greedy(self.lm.encode(prompt), MAX_NEW_TOKENS, stop_after=self.question_marks)
        return out.text


def generated_queries(
    documents: Iterable[Document],
    count: int,
    seed: int,
    cache: Path,
    generator: QuestionGenerator | None = None,
    model: str = "smollm2",
) -> QuerySource:
    """Up to ``count`` generated questions over documents drawn at random (seeded), each document the
    relevant passage of its own question; outcomes are kept in ``cache`` (JSONL) and reused."""
    from tqdm import tqdm

    docs = list(documents)
    order = [docs[int(i)] for i in np.random.default_rng(seed).permutation(len(docs))]
    done: dict[str, str | None] = {}
    if cache.exists():
        for line in cache.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                done[row["doc_id"]] = row["query"]
    accepted = sum(1 for q in done.values() if q)
    cache.parent.mkdir(parents=True, exist_ok=True)
    with cache.open("a") as out, tqdm(total=count, initial=min(accepted, count), desc="generate queries") as bar:
        for doc in order:
            if accepted >= count:
                break
            if doc.id in done:
                continue
            if generator is None:
                generator = QuestionGenerator(model)
            raw = generator(doc)
            question = clean_question(raw)
            done[doc.id] = question
            out.write(json.dumps({"doc_id": doc.id, "query": question, "generated": raw}) + "\n")
            out.flush()
            if question:
                accepted += 1
                bar.update(1)
    queries: list[Query] = []
    qrels: dict[str, dict[str, int]] = {}
    for doc in order:
        question = done.get(doc.id)
        if question and len(queries) < count:
            qid = f"generated-{doc.id}"
            queries.append(Query(id=qid, text=question))
            qrels[qid] = {doc.id: 1}
    if not queries:
        raise StreamRankError(f"the generator {model!r} wrote no usable question for {len(done)} documents")
    description = (
        f"generated pseudo-queries (GPL-style, {model}): {len(queries)} questions kept of "
        f"{len(done)} documents tried, of {len(docs)}; each document is the relevant passage of its own question"
    )
    return QuerySource(queries, qrels, "generated-queries", description)
