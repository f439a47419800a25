"""``streamrank tune``: a grid search of one stage's query-time options on a train split.

The stages before the tuned one run once over the split's judged queries; then, for every point of the grid,
the tuned stage is rebuilt from its TOML table with the point's options on top and run (with any stages after
it) over copies of those rankings. Every point is scored per query, so the report can say how much of the
best point's gain is selection noise: a k-fold cross-validation picks the best point on k - 1 folds
and scores it on the held-out fold, against the incoming ranking (the stages before the tuned one)
and against the options the file already has. Only query-time options can be tuned; an option the
stage's index was built with (a PPR graph's ``neighbors``) makes the index mismatch, which is
reported as such. Refuses a split named ``test``.
"""

from __future__ import annotations

import itertools
import json
import sys
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from streamrank.errors import ConfigError, StreamRankError
from streamrank.eval.metrics import measure_name
from streamrank.types import Ranking

CV_REPEATS = 10


# ---- tuning -----------------------------------------------------------------------------------
def parse_grid(items: Sequence[str]) -> dict[str, list[Any]]:
    """``["weight=0.1,0.25", "fusion=rrf,interpolate"]`` -> option -> values (TOML literals, else strings)."""
    grid: dict[str, list[Any]] = {}
    for item in items:
        key, sep, values = item.partition("=")
        key = key.strip()
        if not sep or not key or not values.strip():
            raise ConfigError(f"--grid {item!r}: expected OPTION=VALUE[,VALUE...], e.g. weight=0.1,0.25")
        grid[key] = [_literal(v.strip()) for v in values.split(",") if v.strip()]
    return grid


def _literal(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def grid_points(grid: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
    """Every combination of the grid's values, in a stable order."""
    keys = list(grid)
    return [dict(zip(keys, values, strict=True)) for values in itertools.product(*(grid[k] for k in keys))]


def cross_validated_gain(
    scores: np.ndarray, reference: np.ndarray, folds: int = 5, repeats: int = CV_REPEATS, seed: int = 0
) -> tuple[float, float]:
    """Mean and sd over repeats of the k-fold gain of "pick the best row on k-1 folds" over ``reference``.

    ``scores`` is points x queries, ``reference`` one value per query (same order).
    """
    n = scores.shape[1]
    if n < folds:
        raise StreamRankError(f"{n} queries are too few for {folds}-fold cross-validation")
    rng = np.random.default_rng(seed)
    gains = []
    for _ in range(repeats):
        fold = rng.permutation(n) % folds
        held = np.empty(n)
        for f in range(folds):
            train, test = fold != f, fold == f
            held[test] = scores[scores[:, train].mean(axis=1).argmax(), test]
        gains.append(held.mean() - reference.mean())
    return float(np.mean(gains)), float(np.std(gains))


def _fresh(rankings: Sequence[Ranking]) -> list[Ranking]:
    """Copies of the rankings' lists and dicts, which ``Pipeline.run`` appends to (timings, notes).

    Candidates are shared: stages never change them in place (``Ranking.rescored`` makes new ones).
    """
    return [
        replace(r, candidates=list(r.candidates), notes=list(r.notes), timings_ms=dict(r.timings_ms))
        for r in rankings
    ]


def tune_stage(
    dataset: str,
    pipeline: str | Path,
    grid: Mapping[str, Sequence[Any]],
    *,
    split: str = "train",
    stage: str | None = None,
    measure: str = "nDCG@10",
    folds: int = 5,
    limit: int | None = None,
    batch_size: int = 32,
    output: Path | None = None,
) -> dict[str, Any]:
    """Score every grid point of ``stage`` (default: the last) on ``dataset``/``split``; see the module doc."""
    from streamrank.compose import build_in, load_pipeline, validate_stage
    from streamrank.config import read_config
    from streamrank.datasets import load_dataset, refuse_test_split
    from streamrank.eval.metrics import per_query_metrics
    from streamrank.eval.runner import rank_run
    from streamrank.pipeline import Pipeline

    refuse_test_split(split, "tune a stage", "cross-validation on train says how far the gain carries")
    if not grid:
        raise ConfigError("nothing to tune: give at least one --grid OPTION=VALUE[,VALUE...]")
    name = measure_name(measure)
    data = load_dataset(dataset)
    queries = data.queries(split)[: limit if limit else None]
    if not queries:
        raise StreamRankError(f"dataset {data.name!r} has no judged queries in split {split!r}")
    judged = data.qrels(split)
    qrels = {q.id: judged[q.id] for q in queries}
    excluded = data.excluded_ids(split)
    config, source = read_config(pipeline)
    pipe = load_pipeline(pipeline, corpus=str(dataset))
    try:
        names = [s.name for s in pipe.stages]
        position = len(names) - 1 if stage is None else (names.index(stage) if stage in names else -1)
        if position < 0:
            raise ConfigError(f"{source}: no top-level stage named {stage!r} (stages: {', '.join(names)})")
        target = names[position]
        options = dict(config.stages[position])

        def where(point: Mapping[str, Any]) -> str:
            return f"{source}: stages[{position}] with {json.dumps(point)}"

        points = [{}, *grid_points(grid)]
        for point in points:  # a typo in the last value fails now, not after the other points ran
            validate_stage({**options, **point}, where(point))
        pipe.index()
        prefix = Pipeline(f"{pipe.name}-before-{target}", pipe.stages[:position], pipe.context)
        pools = prefix.run_batched([Ranking(query=q) for q in queries], batch_size, desc="stages before")
        suffix = pipe.stages[position + 1 :]

        def score(rankings: Sequence[Ranking], stages: Sequence[Any], label: str) -> np.ndarray:
            part = Pipeline(label, list(stages), pipe.context)
            run = rank_run(part, _fresh(rankings), batch_size, excluded)[0]
            per_query = per_query_metrics({qid: dict(hits) for qid, hits in run.items()}, qrels, [measure])
            return np.array([per_query[q.id][name] for q in queries])

        incoming = score(pools, [], "incoming") if position > 0 else None
        rows: list[dict[str, Any]] = []
        per_point: list[np.ndarray] = []
        for point in points:
            built = build_in(pipe, {**options, **point}, where(point))
            try:
                values = score(pools, [built, *suffix], f"{target} {point}")
            finally:
                built.close()
            rows.append({"options": point, name: float(values.mean())})
            per_point.append(values)
            label = json.dumps(point) if point else "(as configured)"
            print(f"{name} {values.mean():.4f}  {label}", file=sys.stderr, flush=True)
    finally:
        pipe.close()

    scores = np.vstack(per_point)
    best = int(scores[1:].mean(axis=1).argmax()) + 1
    configured = scores[0]
    diff = scores[best] - configured
    result: dict[str, Any] = {
        "dataset": data.name,
        "split": split,
        "pipeline": str(source),
        "stage": target,
        "measure": name,
        "queries": len(queries),
        "configured": rows[0][name],
        "best": rows[best],
        "best_minus_configured": {
            "mean": float(diff.mean()),
            "paired_se": float(diff.std(ddof=1) / np.sqrt(len(diff))) if len(diff) > 1 else 0.0,
        },
        "points": rows[1:],
    }
    cv_mean, cv_sd = cross_validated_gain(scores, configured, folds)
    result["cross_validated_gain_over_configured"] = {"folds": folds, "mean": cv_mean, "sd": cv_sd}
    if incoming is not None:
        result["incoming"] = float(incoming.mean())
        cv_mean, cv_sd = cross_validated_gain(scores, incoming, folds)
        result["cross_validated_gain_over_incoming"] = {"folds": folds, "mean": cv_mean, "sd": cv_sd}
    if output is not None:
        output.mkdir(parents=True, exist_ok=True)
        (output / "tune.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def render_summary(result: Mapping[str, Any], top: int = 10) -> str:
    """The best points as a markdown table and what cross-validation says about them."""
    name = result["measure"]
    points = sorted(result["points"], key=lambda r: -r[name])[:top]
    lines = [
        f"{result['dataset']} {result['split']} ({result['queries']} queries), stage {result['stage']!r}, {name}",
        "",
        f"| options | {name} |",
        "|---|---|",
        f"| (as configured) | {result['configured']:.4f} |",
    ]
    if "incoming" in result:
        lines.append(f"| (without the stage) | {result['incoming']:.4f} |")
    lines += [f"| {json.dumps(p['options'])} | {p[name]:.4f} |" for p in points]
    d = result["best_minus_configured"]
    lines += ["", f"best minus as configured: {d['mean']:+.4f} (paired SE {d['paired_se']:.4f})"]
    for key, label in (("configured", "as configured"), ("incoming", "without the stage")):
        cv = result.get(f"cross_validated_gain_over_{key}")
        if cv:
            lines.append(
                f"{cv['folds']}-fold cross-validated gain of picking the best point, over {label}: "
                f"{cv['mean']:+.4f} (sd {cv['sd']:.4f} over {CV_REPEATS} fold splits)"
            )
    best = result["best"]["options"]
    lines += ["", "best point, as TOML for the stage's table:"]
    lines += [f"{k} = {json.dumps(v)}" for k, v in best.items()]
    return "\n".join(lines)
