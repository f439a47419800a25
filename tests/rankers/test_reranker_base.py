"""The reranker base class: per-query default of the batch hook, merging the top back, the call log."""

from __future__ import annotations

from typing import ClassVar

import pytest
from pydantic import Field

from streamrank.context import PipelineContext
from streamrank.errors import RankerError
from streamrank.rankers.base import Reranker
from streamrank.stage import StageConfig
from streamrank.types import Candidate, Document, ModelCall, Query, Ranking


class LengthConfig(StageConfig):
    depth: int = Field(3, ge=1)


class ByLength(Reranker):
    """Test reranker: longer passages first; one recorded call per query."""

    Config: ClassVar[type[StageConfig]] = LengthConfig
    call_seconds_digits: ClassVar[int | None] = 2

    def score_top(self, ranking: Ranking, texts: list[str]) -> list[float]:
        self.record_call(ranking, "ruler", seconds=0.123456, prompt_tokens=len(texts), note="lengths")
        return [float(len(t)) for t in texts]


def ranking_of(texts: list[str | None], qid: str = "q") -> Ranking:
    return Ranking(
        Query(qid, "query"),
        [
            Candidate(f"d{i}", float(-i), i + 1, document=None if t is None else Document(f"d{i}", t))
            for i, t in enumerate(texts)
        ],
    )


def test_top_reranked_rest_kept_below_and_calls_recorded() -> None:
    stage = ByLength.from_dict({"kind": "bylength", "k": 4}, PipelineContext(None))
    first, empty = stage.run([ranking_of(["a", "ccc", "bb", "dddd", "e"]), ranking_of([], "q2")])
    assert first.doc_ids() == ["d1", "d2", "d0", "d3"]  # top 3 by length, then d3 (k = 4 keeps 4)
    assert [c.score for c in first.candidates] == [3.0, 2.0, 1.0, 0.0]
    assert first.candidates[0].stage_scores == {"bylength": 3.0}
    assert first.calls == [ModelCall("bylength", "ruler", 3, 0, 0.12, "lengths")]
    assert empty.candidates == [] and empty.calls == []


def test_missing_documents_are_named_in_the_error() -> None:
    stage = ByLength.from_dict({"kind": "bylength", "name": "len"}, PipelineContext(None))
    assert stage.candidate_texts(ranking_of(["a", None])) == ["a", ""]
    with pytest.raises(RankerError, match=r"^len: no text for candidates \['d1'\]"):
        stage.run([ranking_of(["a", None, "b", "c"])])
    stage.documents_label = "reranker"
    with pytest.raises(RankerError, match=r"^reranker: no text"):
        stage.run([ranking_of(["a", None])])
    # only the top ``depth`` need text
    assert stage.run([ranking_of(["a", "b", "c", None])])[0].doc_ids()[-1] == "d3"


def test_without_depth_the_whole_list_is_reranked() -> None:
    stage = ByLength.from_dict({"kind": "bylength"}, PipelineContext(None))
    stage.config = StageConfig(kind="bylength")  # a config without ``depth``
    assert stage.depth is None
    ranked = stage.merge_reranked(ranking_of(["a", "b", "c"]), [1.0, 3.0, 2.0])
    assert ranked.doc_ids() == ["d1", "d2", "d0"]
