"""``streamrank train-ranker``: fit a pipeline's ``learned`` stage (:mod:`streamrank.rankers.learned`).

The stages before it run over the split's judged queries, their pools are labelled from the qrels, and
lambdarank is fitted and written where the stage will look for it. Refuses a split named ``test``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from streamrank.errors import ConfigError, StreamRankError
from streamrank.index.manifest import write_atomic, write_json_atomic
from streamrank.rankers.learned import (
    LearnedConfig,
    LearnedRanker,
    RankerModel,
    feature_names,
    ranking_features,
    sidecar,
    stage_keys_of,
    train_lambdarank,
)
from streamrank.types import Ranking


def train_ranker(
    dataset: str,
    pipeline: str | Path,
    split: str = "train",
    output: Path | None = None,
    limit: int | None = None,
    *,
    batch_size: int = 32,
) -> Path:
    """Train the pipeline's ``learned`` stage on ``dataset``/``split``; returns the model path.

    Runs the stages before the learned one over the split's judged queries, builds features and
    graded labels from the qrels, trains lambdarank and writes the model where the stage will look
    for it (or to ``output``). Refuses a split named ``test``.
    """
    from streamrank.compose import load_pipeline
    from streamrank.datasets import load_dataset, refuse_test_split
    from streamrank.pipeline import Pipeline

    refuse_test_split(split, "train the ranker", "early stopping holds out part of train itself")

    data = load_dataset(dataset)
    queries = data.queries(split)[: limit if limit else None]
    if not queries:
        raise StreamRankError(f"dataset {data.name!r} has no judged queries in split {split!r}")
    qrels = data.qrels(split)
    pipe = load_pipeline(pipeline, corpus=str(dataset))
    try:
        position = next((i for i, s in enumerate(pipe.stages) if isinstance(s, LearnedRanker)), None)
        if position is None:
            raise ConfigError(f"{pipeline}: the pipeline has no `learned` stage to train")
        stage: LearnedRanker = pipe.stages[position]  # type: ignore[assignment]
        if position == 0:
            raise ConfigError(f"{pipeline}: the `learned` stage needs generator stages before it")
        pipe.index()
        prefix = Pipeline(f"{pipe.name}-generators", pipe.stages[:position], pipe.context)
        pools = prefix.run_batched([Ranking(query=q) for q in queries], batch_size, desc="generators")
        path = Path(output) if output is not None else stage.model_path
        model = fit_ranker_model(
            pools, qrels, stage.config, exclude=[stage.name, *stage.config.exclude_stages]
        )
        model.meta.update(
            {"dataset": data.name, "split": split, "pipeline": str(pipeline), "queries": len(queries)}
        )
        save_ranker_model(model, path)
    finally:
        pipe.close()
    return path


def fit_ranker_model(
    pools: Sequence[Ranking],
    qrels: Mapping[str, Mapping[str, int]],
    config: LearnedConfig,
    exclude: Sequence[str] = (),
) -> RankerModel:
    """Features and labels of labelled pools (queries with no relevant candidate skipped), then lambdarank."""
    usable = [r for r in pools if any(qrels.get(r.query.id, {}).get(c.doc_id, 0) > 0 for c in r.candidates)]
    if len(usable) < 2:
        raise StreamRankError(
            f"only {len(usable)} queries have a relevant document among the candidates: too few to train"
        )
    keys = stage_keys_of(usable, exclude)
    features = np.vstack([ranking_features(r, keys) for r in usable])
    labels = np.concatenate(
        [[max(0, qrels[r.query.id].get(c.doc_id, 0)) for c in r.candidates] for r in usable]
    ).astype(np.float64)
    booster, summary = train_lambdarank(
        features, labels, [len(r.candidates) for r in usable], feature_names(keys), config=config
    )
    summary["skipped_queries"] = len(pools) - len(usable)
    return RankerModel(booster, keys, summary)


def save_ranker_model(model: RankerModel, path: Path) -> None:
    """Write the LightGBM text model and ``<path>.json`` (stage keys, features, training facts)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(
        path,
        lambda tmp: model.booster.save_model(str(tmp), num_iteration=model.booster.best_iteration or None),
    )
    write_json_atomic(
        sidecar(path), {**model.meta, "stage_keys": model.stage_keys, "features": model.features}
    )
