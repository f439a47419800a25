"""TREC run files (``qid Q0 docid rank score tag``) and turning rankings into runs."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from streamrank.types import Candidate

RunList = dict[str, list[tuple[str, float]]]
"""Query id -> [(doc id, score)], best first."""


def read_trec_run(path: str | Path) -> dict[str, list[tuple[str, int, float]]]:
    """Query id -> [(doc id, rank, score)] sorted by the rank column (file order breaks ties)."""
    rows: dict[str, list[tuple[str, int, float]]] = {}
    with Path(path).open(encoding="utf-8") as fh:
        for number, line in enumerate(fh, start=1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) < 5:
                raise ValueError(f"{path}:{number}: expected `qid Q0 docid rank score [tag]`, got {line!r}")
            rows.setdefault(parts[0], []).append((parts[2], int(parts[3]), float(parts[4])))
    for hits in rows.values():
        hits.sort(key=lambda row: row[1])
    return rows


def ranked_scores(candidates: Iterable[Candidate]) -> list[tuple[str, float]]:
    """(doc id, score) best first, one entry per document, with scores strictly decreasing.

    trec_eval and ir_measures order a run by score, not by position; when a ranking's scores tie
    or are not sorted (a reranker that only reorders), they are replaced by ``n - position`` so the
    evaluated order is exactly the order the pipeline returned.
    """
    seen: set[str] = set()
    pairs = []
    for cand in candidates:
        if cand.doc_id not in seen:
            seen.add(cand.doc_id)
            pairs.append((cand.doc_id, float(cand.score)))
    if all(a[1] > b[1] for a, b in zip(pairs, pairs[1:], strict=False)):
        return pairs
    n = len(pairs)
    return [(doc_id, float(n - i)) for i, (doc_id, _) in enumerate(pairs)]


def write_trec_run(path: str | Path, run: Mapping[str, Sequence[tuple[str, float]]], tag: str) -> None:
    """Write a standard 6-column run; ``run`` lists each query's (doc id, score) best first."""
    tag = "_".join(tag.split()) or "streamrank"
    with Path(path).open("w", encoding="utf-8") as fh:
        for qid, hits in run.items():
            for rank, (doc_id, score) in enumerate(hits, start=1):
                fh.write(f"{qid} Q0 {doc_id} {rank} {float(score)!r} {tag}\n")
