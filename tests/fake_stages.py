"""Small stages for end-to-end tests of control flow (training, tuning) on the tiny dataset fixture.

Register one with ``monkeypatch.setitem(compose.STAGE_KINDS, "overlap", "fake_stages:Overlap")``.
"""

from __future__ import annotations

from collections.abc import Sequence

from streamrank.stage import BaseStage
from streamrank.types import Candidate, Ranking


class Overlap(BaseStage):
    """Test retriever: every stored document, scored by words shared with the query."""


    def run(self, rankings: Sequence[Ranking]) -> list[Ranking]:
        docs = list(self.context.store)
        out = []
        for r in rankings:
            words = set(r.query.text.split())
            scores = [len(words & set(d.text.split())) + 0.01 * (i % 3) for i, d in enumerate(docs)]
            pool = [Candidate(d.id, 0.0) for d in docs]
            out.append(r.rescored(self.name, scores, candidates=pool, keep=self.config.k))
        return out


class Reverse(BaseStage):
    """Test reranker: the incoming candidates in reverse order, the best ``k`` kept."""

    def run(self, rankings: Sequence[Ranking]) -> list[Ranking]:
        return [r.rescored(self.name, [float(i) for i in range(len(r.candidates))], keep=self.config.k) for r in rankings]
