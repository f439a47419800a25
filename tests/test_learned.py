"""Generator-ranker: features, lambdarank training, train_ranker refusals and the missing-model error."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

import streamrank
from streamrank import registry
from streamrank.errors import IndexMissingError, StreamRankError
from streamrank.rankers.learned import (
    MISSING_RANK,
    LearnedConfig,
    RankerModel,
    feature_names,
    fit_ranker_model,
    ranking_features,
    train_lambdarank,
    train_ranker,
)
from streamrank.stage import BaseStage
from streamrank.types import Candidate, Document, Query, Ranking


def test_features_rank_scores_and_mark_missing_stages() -> None:
    pool = [
        Candidate("d1", 0.9, 1, {"bm25": 3.0, "dense": 0.2}, Document("d1", "one two three", "t")),
        Candidate("d2", 0.5, 2, {"dense": 0.8}),
    ]
    x = ranking_features(Ranking(Query("q", "a query"), pool), ["bm25", "dense"])
    names = feature_names(["bm25", "dense"])
    row = dict(zip(names, x[1], strict=True))
    assert np.isnan(row["bm25_score"]) and row["bm25_rank"] == MISSING_RANK and np.isnan(row["doc_words"])
    assert (
        row["dense_rank"] == 1 and row["dense_gap"] == 0 and row["pool_rank"] == 2 and row["query_words"] == 2
    )
    assert dict(zip(names, x[0], strict=True))["dense_gap"] == pytest.approx(0.6)


def test_lambdarank_learns_an_obvious_signal() -> None:
    rng = np.random.default_rng(0)
    groups, rows, labels = [], [], []
    for _ in range(120):
        n = 20
        relevant = rng.random(n) < 0.15
        relevant[rng.integers(n)] = True
        signal = relevant * 1.0 + rng.normal(0, 0.3, n)  # the signal feature
        noise = rng.normal(0, 1, (n, 2))
        rows.append(np.column_stack([noise[:, 0], signal, noise[:, 1]]))
        labels.append(relevant.astype(float))
        groups.append(n)
    X, y = np.vstack(rows), np.concatenate(labels)
    booster, summary = train_lambdarank(
        X[:2000],
        y[:2000],
        groups[:100],
        ["noise_a", "signal", "noise_b"],
        config=LearnedConfig(kind="learned"),
    )
    assert summary["valid_queries"] == 20 and summary["valid_ndcg@10"] > 0.9
    importance = dict(zip(booster.feature_name(), booster.feature_importance("gain"), strict=True))
    assert importance["signal"] > 5 * max(importance["noise_a"], importance["noise_b"])
    held_out = booster.predict(X[2000:])
    hits = [np.argmax(held_out[i * 20 : (i + 1) * 20]) for i in range(20)]
    assert np.mean([y[2000 + i * 20 + h] for i, h in enumerate(hits)]) >= 0.9


def test_training_on_the_test_split_is_refused() -> None:
    with pytest.raises(StreamRankError, match="refusing to train the ranker on the test split"):
        train_ranker("scifact", "configs/learned.toml", split="test")


def test_missing_model_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "p.toml"
    path.write_text(
        f'name = "p"\ncorpus = "toy"\nindex_dir = "{tmp_path / "idx"}"\n'
        f'[[stages]]\nkind = "learned"\nmodel_path = "{tmp_path / "none.txt"}"\n'
    )
    pipeline = streamrank.load_pipeline(path)
    ranking = Ranking(Query("q", "x"), [Candidate("d", 1.0, 1, {"bm25": 1.0})])
    with pytest.raises(
        IndexMissingError, match=r"streamrank train-ranker --dataset toy --split train --pipeline"
    ):
        pipeline.run([ranking])


# ---- end to end on a tiny BEIR-layout dataset -----------------------------------------------------
class KeyPrior(BaseStage):
    """Test stage: a second generator score, 1 for the (relevant) documents tagged "key"."""

    def run(self, rankings: Sequence[Ranking]) -> list[Ranking]:
        self.context.attach_documents(rankings)
        return [
            r.rescored(self.name, [float("key" in c.document.text) for c in r.candidates]) for r in rankings
        ]


def test_train_ranker_end_to_end(tmp_path: Path, tiny_dataset: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(registry.STAGE_KINDS, "overlap", "fake_stages:Overlap")
    monkeypatch.setitem(registry.STAGE_KINDS, "prior", f"{__name__}:KeyPrior")
    data = tiny_dataset
    model_path = tmp_path / "models" / "ranker.txt"
    config = tmp_path / "learned.toml"
    config.write_text(
        f'name = "tiny"\ncorpus = "{data}"\nindex_dir = "{tmp_path / "idx"}"\n'
        '[[stages]]\nkind = "overlap"\nk = 100\n'
        '[[stages]]\nkind = "prior"\n'
        f'[[stages]]\nkind = "learned"\nmodel_path = "{model_path}"\nmin_data_in_leaf = 2\nnum_trees = 30\n'
    )
    written = train_ranker(str(data), config, split="train")
    assert written == model_path and model_path.is_file()
    meta = json.loads(model_path.with_name("ranker.txt.json").read_text())
    assert meta["stage_keys"] == ["overlap", "prior"] and meta["split"] == "train" and meta["queries"] == 30
    assert RankerModel.load(model_path).features == feature_names(["overlap", "prior"])

    pipeline = streamrank.load_pipeline(config, corpus=str(data))
    results = pipeline.search_batch([f"topic{q} question" for q in range(30, 40)], k=2)
    assert all(r.candidates[0].doc_id.startswith("rel") for r in results)  # the distractor shares more words
    assert "learned" in results[0].candidates[0].stage_scores

    with pytest.raises(StreamRankError, match="too few"):
        fit_ranker_model([Ranking(Query("q", "x"), [Candidate("d", 1.0)])], {}, LearnedConfig(kind="learned"))
