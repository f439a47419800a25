"""Core: types, TOML config validation, pipeline control flow, the document store."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import pytest

import streamrank
from streamrank import compose as registry
from streamrank.errors import ConfigError, InvalidQueryError
from streamrank.stage import BaseStage, StageConfig
from streamrank.store import DocumentStore
from streamrank.types import Candidate, Document, Query, Ranking


class WordCountConfig(StageConfig):
    word: str = "cell"


class WordCount(BaseStage):
    """Test stage: scores supplied candidates by how often they contain ``word``."""

    Config = WordCountConfig

    def run(self, rankings: Sequence[Ranking]) -> list[Ranking]:
        return [
            r.rescored(self.name, [c.document.text.count(self.config.word) for c in r.candidates], keep=self.config.k)
            for r in rankings
        ]


class SlowConfig(StageConfig):
    seconds: float = 0.05


class Slow(BaseStage):
    Config = SlowConfig

    def run(self, rankings: Sequence[Ranking]) -> list[Ranking]:
        time.sleep(self.config.seconds)
        return [r.rescored(self.name, [-c.score for c in r.candidates]) for r in rankings]


@pytest.fixture
def test_kinds(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(registry.STAGE_KINDS, "wordcount", f"{__name__}:WordCount")
    monkeypatch.setitem(registry.STAGE_KINDS, "slow", f"{__name__}:Slow")


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "p.toml"
    path.write_text(text)
    return path


def test_rescored_sorts_keeps_stage_scores_and_ties_stable() -> None:
    ranking = Ranking(
        Query("q", "x"),
        [Candidate("a", 1.0, 1, {"bm25": 1.0}), Candidate("b", 0.5, 2, {"bm25": 0.5}), Candidate("c", 0.1, 3)],
    )
    out = ranking.rescored("rr", [0.2, 0.9, 0.2])
    assert out.doc_ids() == ["b", "a", "c"]
    assert [c.rank for c in out.candidates] == [1, 2, 3]
    assert out.candidates[1].stage_scores == {"bm25": 1.0, "rr": 0.2}
    assert ranking.doc_ids() == ["a", "b", "c"], "the input ranking is not modified"
    assert out.rescored("m", {"c": 3.0, "a": 1.0}, keep=1).doc_ids() == ["c"]
    with pytest.raises(ValueError, match="2 scores for 3 candidates"):
        ranking.rescored("rr", [1.0, 2.0])


def test_unknown_key_is_named(tmp_path: Path, test_kinds: None) -> None:
    path = write(tmp_path, 'name = "x"\n[[stages]]\nkind = "wordcount"\nwrod = "cell"\n')
    with pytest.raises(ConfigError, match=r"unknown key 'wrod'"):
        streamrank.load_pipeline(path)


def test_unknown_top_level_key_and_kind(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"unknown key 'stagez'"):
        streamrank.load_pipeline(write(tmp_path, 'name = "x"\nstages = []\nstagez = 1\n'))
    with pytest.raises(ConfigError, match=r"unknown stage kind 'bm52'.*known kinds: .*bm25"):
        streamrank.load_pipeline(write(tmp_path, 'name = "x"\n[[stages]]\nkind = "bm52"\n'))
    with pytest.raises(ConfigError, match="needs a `kind`"):
        streamrank.load_pipeline(write(tmp_path, 'name = "x"\n[[stages]]\nk = 3\n'))
    with pytest.raises(ConfigError, match="not valid TOML"):
        streamrank.load_pipeline(write(tmp_path, "name = \n"))
    with pytest.raises(ConfigError, match="not found"):
        streamrank.load_pipeline(tmp_path / "missing.toml")


def test_bad_value_type_is_reported(tmp_path: Path, test_kinds: None) -> None:
    with pytest.raises(ConfigError, match=r"stages\[0\] \(wordcount\): k: .*'many'"):
        streamrank.load_pipeline(write(tmp_path, 'name = "x"\n[[stages]]\nkind = "wordcount"\nk = "many"\n'))


def test_duplicate_stage_names_rejected(tmp_path: Path, test_kinds: None) -> None:
    text = 'name = "x"\n[[stages]]\nkind = "wordcount"\n[[stages]]\nkind = "wordcount"\n'
    with pytest.raises(ConfigError, match="unique"):
        streamrank.load_pipeline(write(tmp_path, text))


def test_pipeline_reranks_supplied_documents_and_times_stages(tmp_path: Path, test_kinds: None) -> None:
    text = 'name = "x"\n[[stages]]\nkind = "wordcount"\nk = 2\n'
    pipeline = streamrank.load_pipeline(write(tmp_path, text))
    docs = ["no match", "cell cell cell", "one cell"]
    ranking = pipeline.rerank("which cell", docs)
    assert ranking.doc_ids() == ["1", "2"]
    assert ranking.candidates[0].stage_scores == {"wordcount": 3.0}
    assert ranking.timings_ms["wordcount"] >= 0.0
    assert ranking.candidates[0].document.text == "cell cell cell"


def test_empty_query_rejected(tmp_path: Path, test_kinds: None) -> None:
    pipeline = streamrank.load_pipeline(write(tmp_path, 'name = "x"\n[[stages]]\nkind = "wordcount"\n'))
    for bad in ["", "   "]:
        with pytest.raises(InvalidQueryError, match="empty"):
            pipeline.rerank(bad, ["a"])


def test_deadline_returns_earlier_ranking_marked_degraded(tmp_path: Path, test_kinds: None) -> None:
    text = 'name = "x"\n[[stages]]\nkind = "slow"\nseconds = 0.1\n[[stages]]\nkind = "wordcount"\n'
    pipeline = streamrank.load_pipeline(write(tmp_path, text))
    pool = [Candidate(str(i), 0.0, document=Document(str(i), "cell " * i)) for i in range(3)]
    # The deadline lapses while "slow" runs: "wordcount" is skipped, slow's ranking comes back.
    late = pipeline.run([Ranking(Query("q", "cell"), pool)], deadline=time.monotonic() + 0.05)[0]
    assert late.degraded and "'wordcount'" in late.notes[0]
    assert late.doc_ids() == ["0", "1", "2"] and "wordcount" not in late.timings_ms
    full = pipeline.run([Ranking(Query("q", "cell"), pool)])[0]
    assert not full.degraded and full.doc_ids() == ["2", "1", "0"]


def test_store_upsert_get_delete_checksum(tmp_path: Path) -> None:
    store = DocumentStore(tmp_path / "docs.sqlite")
    store.upsert([Document("a", "alpha", "A"), Document("b", "beta")])
    first = store.checksum()
    store.upsert([Document("a", "alpha two", "A")])
    assert len(store) == 2 and store.get("a").text == "alpha two"
    assert store.checksum() != first
    assert store.ids() == ["a", "b"], "replacing keeps the original insertion order"
    assert store.delete(["b"]) == 1 and "b" not in store
    store.close()
    reopened = DocumentStore(tmp_path / "docs.sqlite")
    assert reopened.get("a").title == "A" and len(reopened) == 1
    assert reopened.get_many(["a", "zz"]).keys() == {"a"}


def test_length_buckets_bound_padding_and_batch_size() -> None:
    from streamrank.models import length_buckets

    lengths = [10, 50, 12, 48, 11, 9, 49, 10]
    batches = length_buckets(lengths, max_batch=3, slack=0.25)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for batch in batches:
        assert len(batch) <= 3
        longest = max(lengths[i] for i in batch)
        assert longest * len(batch) <= 1.25 * sum(lengths[i] for i in batch)
    assert {frozenset(b) for b in batches} == {frozenset({1, 3, 6}), frozenset({2, 4, 0}), frozenset({7, 5})}
