"""Core records passed between stages: queries, documents, candidates and rankings."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace


@dataclass(frozen=True)
class Query:
    """A search request: text plus an optional user history (document ids) for personalisation."""

    id: str
    text: str
    user_history: tuple[str, ...] = ()


@dataclass(frozen=True)
class Document:
    """A corpus document. ``contents`` is what lexical and dense models see: title and body."""

    id: str
    text: str
    title: str = ""

    @property
    def contents(self) -> str:
        return f"{self.title} {self.text}".strip() if self.title else self.text


@dataclass
class Candidate:
    """A document in a ranking, with its current score and the score each stage gave it."""

    doc_id: str
    score: float
    rank: int = 0
    stage_scores: dict[str, float] = field(default_factory=dict)
    document: Document | None = None


@dataclass(frozen=True)
class ModelCall:
    """One model invocation made while ranking (kept so every result explains its cost)."""

    stage: str
    model: str
    prompt_tokens: int = 0
    output_tokens: int = 0
    seconds: float = 0.0
    note: str = ""


@dataclass
class Ranking:
    """The candidates for one query, best first, with per-stage timings (ms) and a model-call log."""

    query: Query
    candidates: list[Candidate] = field(default_factory=list)
    timings_ms: dict[str, float] = field(default_factory=dict)
    calls: list[ModelCall] = field(default_factory=list)
    degraded: bool = False
    notes: list[str] = field(default_factory=list)

    def top_k(self, k: int) -> Ranking:
        """A copy that keeps only the best ``k`` candidates."""
        return replace(self, candidates=self.candidates[:k])

    def doc_ids(self) -> list[str]:
        return [c.doc_id for c in self.candidates]

    def rescored(
        self,
        stage: str,
        scores: Sequence[float] | Mapping[str, float],
        *,
        keep: int | None = None,
        candidates: Iterable[Candidate] | None = None,
    ) -> Ranking:
        """Give ``candidates`` (default: the current ones) new scores from ``stage``, sorted best first.

        ``scores`` is either parallel to the candidates or a mapping doc id -> score (candidates
        missing from the mapping are dropped). The stage's score is recorded in ``stage_scores``;
        ties keep the incoming order, so a stage that cannot tell two documents apart never
        reorders them arbitrarily.
        """
        pool = list(self.candidates if candidates is None else candidates)
        if isinstance(scores, Mapping):
            pairs = [(c, float(scores[c.doc_id])) for c in pool if c.doc_id in scores]
        else:
            if len(scores) != len(pool):
                raise ValueError(f"stage {stage!r} returned {len(scores)} scores for {len(pool)} candidates")
            pairs = [(c, float(s)) for c, s in zip(pool, scores, strict=True)]
        order = sorted(range(len(pairs)), key=lambda i: -pairs[i][1])
        if keep is not None:
            order = order[:keep]
        ranked = []
        for rank, i in enumerate(order, start=1):
            old, score = pairs[i]
            ranked.append(
                Candidate(
                    doc_id=old.doc_id,
                    score=score,
                    rank=rank,
                    stage_scores={**old.stage_scores, stage: score},
                    document=old.document,
                )
            )
        return replace(self, candidates=ranked)
