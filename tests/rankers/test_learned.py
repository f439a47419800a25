"""Generator-ranker: features, lambdarank training and the missing-model error (training it end to end:
tests/eval/test_training.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import streamrank
from streamrank.errors import IndexMissingError
from streamrank.rankers.learned import (
    MISSING_RANK,
    LearnedConfig,
    feature_names,
    ranking_features,
    train_lambdarank,
)
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
