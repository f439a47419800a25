"""Training examples for the one-pass rerankers: queries, the first stage's pools, target orders.

Where the queries come from (:func:`training_queries`): the split's judged queries when the dataset
has qrels for it; otherwise (Cranfield, CISI, a user's corpus) pseudo-queries made from the corpus,
GPL-style: a document's title, or its first sentence when it has none (or a question an LLM wrote for
it: :mod:`~streamrank.eval.training.query_generation`), is the query and the document it came from is
its one relevant passage.

The target order of a pool (:func:`target_order`): passages judged relevant first (higher grade
first), then the rest in the teacher pipeline's order (passages the teacher did not return after
those, in the first stage's order); without a teacher the first stage's order stands for it.

An :class:`Example` holds doc ids only (texts are read from the pipeline's store), so a training
run's examples are saved as JSON beside its checkpoint and a resumed run reuses them.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from streamrank.datasets import Dataset
from streamrank.errors import StreamRankError
from streamrank.types import Document, Query

PSEUDO_QUERIES = 1000
"""Pseudo-queries drawn from a corpus without train qrels (unless ``--limit`` says otherwise)."""
PSEUDO_MAX_WORDS = 32
MIN_QUERY_WORDS = 3


@dataclass(frozen=True)
class Example:
    """One query's pool (first-stage order, top ``depth``) and the order it should have."""

    query_id: str
    query: str
    doc_ids: tuple[str, ...]
    target: tuple[int, ...]
    """Indices into ``doc_ids``, best first."""
    relevant: int
    """How many of ``doc_ids`` are judged (or pseudo-) relevant: they lead ``target``."""

    def window(self, members: Sequence[int]) -> Example:
        """The example restricted to ``members`` (indices into ``doc_ids``), target order kept."""
        index = {m: k for k, m in enumerate(members)}
        target = tuple(index[i] for i in self.target if i in index)
        relevant = sum(1 for i in self.target[: self.relevant] if i in index)
        return Example(self.query_id, self.query, tuple(self.doc_ids[m] for m in members), target, relevant)


@dataclass(frozen=True)
class QuerySource:
    """The training queries, their (pseudo-) qrels and a line saying where they came from."""

    queries: list[Query]
    qrels: dict[str, dict[str, int]]
    kind: str
    """``"qrels"`` or ``"pseudo-queries"``."""
    description: str


def pseudo_query(document: Document) -> str | None:
    """A document's title, else its first sentence (cut to PSEUDO_MAX_WORDS words); None if too short."""
    text = " ".join((document.title or "").split())
    if len(text.split()) < MIN_QUERY_WORDS:
        body = " ".join(document.text.split())
        text = re.split(r"(?<=[.!?])\s", body, maxsplit=1)[0] if body else ""
    words = text.split()
    if len(words) < MIN_QUERY_WORDS:
        return None
    return " ".join(words[:PSEUDO_MAX_WORDS])


def pseudo_queries(documents: Iterable[Document], count: int, seed: int) -> QuerySource:
    """``count`` pseudo-queries from documents drawn at random (seeded); see :func:`pseudo_query`."""
    docs = list(documents)
    order = np.random.default_rng(seed).permutation(len(docs))
    queries: list[Query] = []
    qrels: dict[str, dict[str, int]] = {}
    titles = 0
    for i in order:
        doc = docs[int(i)]
        text = pseudo_query(doc)
        if text is None:
            continue
        titles += text == " ".join((doc.title or "").split()[:PSEUDO_MAX_WORDS])
        qid = f"pseudo-{doc.id}"
        queries.append(Query(id=qid, text=text))
        qrels[qid] = {doc.id: 1}
        if len(queries) >= count:
            break
    if not queries:
        raise StreamRankError(
            "no document has a title or a first sentence of 3 words or more to make a query of"
        )
    description = (
        f"pseudo-queries from the corpus (GPL-style): {titles} titles, {len(queries) - titles} first sentences, "
        f"of {len(docs)} documents; each document is the relevant passage of its own query"
    )
    return QuerySource(queries, qrels, "pseudo-queries", description)


PseudoQueryMaker = Callable[[Iterable[Document], int, int], QuerySource]
"""(documents, count, seed) -> pseudo-queries: :func:`pseudo_queries` (titles) or generated questions."""


def training_queries(
    data: Dataset, split: str, limit: int | None, seed: int, make_pseudo: PseudoQueryMaker | None = None
) -> QuerySource:
    """The split's judged queries, or pseudo-queries from the corpus (``make_pseudo``, default titles)
    when the split has no qrels."""
    if split in data.splits():
        queries = data.queries(split)[: limit if limit else None]
        if not queries:
            raise StreamRankError(f"dataset {data.name!r} has no judged queries in split {split!r}")
        judged = data.qrels(split)
        description = f"qrels of split {split!r}: {len(queries)} judged queries"
        return QuerySource(queries, {q.id: judged[q.id] for q in queries}, "qrels", description)
    if not data.has_corpus:
        raise StreamRankError(
            f"dataset {data.name!r} has no split {split!r} and no corpus to make pseudo-queries from "
            f"(splits: {', '.join(data.splits()) or 'none'})"
        )
    return (make_pseudo or pseudo_queries)(data.corpus(), limit or PSEUDO_QUERIES, seed)


def target_order(
    doc_ids: Sequence[str], grades: Mapping[str, int], teacher: Mapping[str, int] | None = None
) -> tuple[tuple[int, ...], int]:
    """(indices of ``doc_ids`` best first, how many are relevant): module docstring.

    ``teacher`` maps doc id -> the teacher's rank (0 best).
    """
    missing = len(doc_ids)

    def key(i: int) -> tuple[int, int, int]:
        rank = teacher.get(doc_ids[i], missing) if teacher is not None else i
        return (-max(grades.get(doc_ids[i], 0), 0), rank, i)

    order = tuple(sorted(range(len(doc_ids)), key=key))
    return order, sum(1 for d in doc_ids if grades.get(d, 0) > 0)


def build_examples(
    pools: Mapping[str, Sequence[str]],
    queries: Sequence[Query],
    qrels: Mapping[str, Mapping[str, int]],
    teacher: Mapping[str, Mapping[str, int]] | None = None,
) -> list[Example]:
    """One example per query with a pool of two or more passages."""
    out = []
    for q in queries:
        ids = list(pools.get(q.id, ()))
        if len(ids) < 2:
            continue
        order, relevant = target_order(
            ids, qrels.get(q.id, {}), None if teacher is None else teacher.get(q.id, {})
        )
        out.append(Example(q.id, q.text, tuple(ids), order, relevant))
    return out


def windows_of(
    examples: Sequence[Example], spans: Callable[[int], Sequence[Sequence[int]]], *, need_signal: bool
) -> list[Example]:
    """Each example cut into the windows/groups ``spans(n)`` gives (lists of member indices).

    With ``need_signal`` a window without a relevant passage is dropped: its target would only
    repeat the first stage's order, which the reranker gets as input anyway.
    """
    out = []
    for example in examples:
        for members in spans(len(example.doc_ids)):
            if len(members) < 2:
                continue
            window = example.window(list(members))
            if need_signal and window.relevant == 0:
                continue
            out.append(window)
    return out


def save_examples(path: Path, examples: Sequence[Example], meta: Mapping[str, object]) -> None:
    """``examples.json``: the examples (doc ids, targets) and how they were made."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"meta": dict(meta), "examples": [asdict(e) for e in examples]}))
    tmp.replace(path)


def load_examples(path: Path) -> tuple[list[Example], dict[str, object]]:
    """What :func:`save_examples` wrote."""
    raw = json.loads(path.read_text())
    examples = [
        Example(e["query_id"], e["query"], tuple(e["doc_ids"]), tuple(e["target"]), int(e["relevant"]))
        for e in raw["examples"]
    ]
    return examples, raw["meta"]
