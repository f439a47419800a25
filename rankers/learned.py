"""Generator-ranker (GRank-style): a LightGBM lambdarank model over the features earlier stages left.

Several generators (BM25, dense MIPS, PPR over the corpus graph) fill the candidate pool through
the stages before this one; each candidate carries every stage's score in ``stage_scores``. This
stage turns them into a feature row per candidate and reorders the pool with a small learned model:

- for every stage key seen in training: the score, its rank within the pool, and its gap to the
  query's best score for that stage (a candidate a stage did not score gets NaN, LightGBM's missing
  value, and rank :data:`MISSING_RANK`);
- the incoming position and score, the document length (words of body and title) and query length.

Feature names and the stage keys are recorded with the model (``<model>.json`` beside LightGBM's
text model). :func:`train_lambdarank` fits the model (200 trees, LightGBM's default leaves, early
stopping on a held-out 20% of the train queries); running the pipeline up to this stage over a
train split and labelling the pools from qrels is ``streamrank train-ranker``
(:func:`streamrank.eval.training.train_ranker`).
"""

from __future__ import annotations

import json
import math
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from pydantic import Field

from streamrank.errors import ConfigError, IndexMismatchError, IndexMissingError
from streamrank.rankers.base import Reranker
from streamrank.stage import StageConfig
from streamrank.types import Ranking

if TYPE_CHECKING:
    import lightgbm

    from streamrank.context import PipelineContext

MISSING_RANK = 10_000
"""Rank feature of a candidate a stage did not score."""
BASE_FEATURES = ("pool_rank", "pool_score", "doc_words", "title_words", "query_words")
PER_STAGE = ("score", "rank", "gap")


class LearnedConfig(StageConfig):
    model_path: str | None = None
    """LightGBM model file; default ``$STREAMRANK_HOME/models/learned-<corpus>.txt``, or
    ``learned-<corpus>-<name>.txt`` for a stage given its own ``name`` (one model per pipeline)."""
    num_trees: int = Field(200, ge=1)
    learning_rate: float = Field(0.05, gt=0)
    num_leaves: int = Field(31, ge=2)
    min_data_in_leaf: int = Field(20, ge=1)
    early_stopping: int = Field(30, ge=1)
    valid_fraction: float = Field(0.2, gt=0, lt=1)
    """Share of the train queries held out for early stopping."""
    seed: int = 0
    exclude_stages: list[str] = Field(default_factory=list)
    """Stage keys left out of the features (their stages still shape the pool and its order)."""


# ---- features ---------------------------------------------------------------------------------
def feature_key(stage: str) -> str:
    """A stage name as LightGBM accepts it in a feature name (no JSON punctuation)."""
    return re.sub(r"[^A-Za-z0-9_]+", "_", stage)


def feature_names(stage_keys: Sequence[str]) -> list[str]:
    return list(BASE_FEATURES) + [f"{feature_key(s)}_{part}" for s in stage_keys for part in PER_STAGE]


def stage_keys_of(rankings: Sequence[Ranking], exclude: Sequence[str] = ()) -> list[str]:
    """Every stage key present in the pools' ``stage_scores`` (sorted), less ``exclude``."""
    found = {key for r in rankings for c in r.candidates for key in c.stage_scores}
    return sorted(found.difference(exclude))


def ranking_features(ranking: Ranking, stage_keys: Sequence[str]) -> np.ndarray:
    """One row per candidate: :data:`BASE_FEATURES`, then score/rank/gap for each of ``stage_keys``."""
    cands = ranking.candidates
    n = len(cands)
    out = np.empty((n, len(BASE_FEATURES) + len(PER_STAGE) * len(stage_keys)), dtype=np.float64)
    out[:, 0] = np.arange(1, n + 1)
    out[:, 1] = [c.score for c in cands]
    out[:, 2] = [len(c.document.text.split()) if c.document else math.nan for c in cands]
    out[:, 3] = [len(c.document.title.split()) if c.document else math.nan for c in cands]
    out[:, 4] = len(ranking.query.text.split())
    col = len(BASE_FEATURES)
    for key in stage_keys:
        scores = np.array([c.stage_scores.get(key, math.nan) for c in cands], dtype=np.float64)
        present = ~np.isnan(scores)
        ranks = np.full(n, float(MISSING_RANK))
        if present.any():
            order = np.flatnonzero(present)[np.argsort(-scores[present], kind="stable")]
            ranks[order] = np.arange(1, len(order) + 1)
            gap = np.nanmax(scores) - scores
        else:
            gap = scores
        out[:, col], out[:, col + 1], out[:, col + 2] = scores, ranks, gap
        col += len(PER_STAGE)
    return out


# ---- model ------------------------------------------------------------------------------------
@dataclass
class RankerModel:
    """A trained booster and the stage keys its features were built from."""

    booster: lightgbm.Booster
    stage_keys: list[str]
    meta: dict[str, Any]

    @property
    def features(self) -> list[str]:
        return feature_names(self.stage_keys)

    def score(self, ranking: Ranking) -> np.ndarray:
        return self.booster.predict(ranking_features(ranking, self.stage_keys), num_threads=1)

    @classmethod
    def load(cls, path: Path) -> RankerModel:
        """Read a model written by training (the LightGBM text model and its ``<path>.json``)."""
        import lightgbm as lgb

        meta = json.loads(sidecar(path).read_text())
        booster = lgb.Booster(model_file=str(path))
        model = cls(booster, list(meta["stage_keys"]), meta)
        if booster.feature_name() != model.features:
            raise IndexMismatchError(
                f"{path}: the model's features do not match {sidecar(path).name}; retrain it"
            )
        return model


def sidecar(path: Path) -> Path:
    """The ``<model>.json`` beside a model file: stage keys, features, training facts."""
    return path.with_name(path.name + ".json")


def train_lambdarank(
    features: np.ndarray,
    labels: np.ndarray,
    groups: Sequence[int],
    names: Sequence[str],
    *,
    config: LearnedConfig | None = None,
) -> tuple[lightgbm.Booster, dict[str, Any]]:
    """Lambdarank on query groups (rows grouped consecutively), early-stopped on held-out groups.

    Returns the booster (``best_iteration`` set) and a summary of the training.
    """
    import lightgbm as lgb

    cfg = config or LearnedConfig(kind="learned")
    groups = np.asarray(groups, dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(groups)])
    rng = np.random.default_rng(cfg.seed)
    held = np.zeros(len(groups), dtype=bool)
    n_valid = max(1, round(len(groups) * cfg.valid_fraction)) if len(groups) > 1 else 0
    held[rng.permutation(len(groups))[:n_valid]] = True
    row_held = np.repeat(held, groups)
    params = {
        "objective": "lambdarank",
        "metric": "ndcg",
        "eval_at": [10],
        "learning_rate": cfg.learning_rate,
        "num_leaves": cfg.num_leaves,
        "min_data_in_leaf": cfg.min_data_in_leaf,
        "num_threads": 1,
        "seed": cfg.seed,
        "deterministic": True,
        "force_col_wise": True,
        "verbosity": -1,
    }
    train = lgb.Dataset(features[~row_held], labels[~row_held], group=groups[~held], feature_name=list(names))
    valid_sets, callbacks = [], []
    if n_valid:
        valid = lgb.Dataset(features[row_held], labels[row_held], group=groups[held], reference=train)
        valid_sets, callbacks = [valid], [lgb.early_stopping(cfg.early_stopping, verbose=False)]
    booster = lgb.train(
        params, train, num_boost_round=cfg.num_trees, valid_sets=valid_sets, callbacks=callbacks
    )
    summary = {
        "params": params,
        "num_trees": cfg.num_trees,
        "best_iteration": booster.best_iteration,
        "train_queries": int((~held).sum()),
        "valid_queries": int(n_valid),
        "rows": int(starts[-1]),
    }
    if n_valid:
        summary["valid_ndcg@10"] = float(booster.best_score["valid_0"]["ndcg@10"])
    return booster, summary


# ---- the stage --------------------------------------------------------------------------------
class LearnedRanker(Reranker):
    """Reorder the incoming pool by a trained lambdarank model (kind ``learned``)."""

    Config = LearnedConfig
    config: LearnedConfig

    def __init__(self, config: LearnedConfig, context: PipelineContext) -> None:
        super().__init__(config, context)
        self._model: RankerModel | None = None
        self._lock = threading.Lock()

    @property
    def model_path(self) -> Path:
        """Where the model lives: ``model_path`` ($VARS and ~ expanded) or the per-corpus default."""
        import os

        if self.config.model_path:
            return Path(os.path.expandvars(self.config.model_path)).expanduser()
        if self.context.corpus is None:
            raise ConfigError(f"stage {self.name!r}: set `model_path` (the pipeline names no corpus)")
        from streamrank.datasets import corpus_key
        from streamrank.models import cache_home

        suffix = "" if self.name == self.config.kind else f"-{self.name}"
        return cache_home() / "models" / f"learned-{corpus_key(self.context.corpus)}{suffix}.txt"

    def model(self) -> RankerModel:
        with self._lock:
            if self._model is None:
                path = self.model_path
                if not path.is_file() or not sidecar(path).is_file():
                    corpus = self.context.corpus or "<dataset>"
                    raise IndexMissingError(
                        f"stage {self.name!r}: no trained ranker at {path}; train one with "
                        f"`streamrank train-ranker --dataset {corpus} --split train --pipeline <this pipeline file>`"
                    )
                self._model = RankerModel.load(path)
            return self._model

    def rerank_batch(self, rankings: Sequence[Ranking]) -> list[Ranking]:
        """The whole pool of each query rescored (documents attached where the store has them)."""
        model = self.model()
        if self.context.index_dir is not None:
            self.context.attach_documents(rankings)
        return [
            r.rescored(self.name, model.score(r), keep=self.config.k) if r.candidates else r for r in rankings
        ]

    def close(self) -> None:
        self._model = None
