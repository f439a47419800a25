"""Retrieval metrics through ir_measures (pytrec_eval underneath), averaged over every judged query.

Measure names are ir_measures names and are reported exactly as ir_measures prints them
(``MAP`` is reported as ``AP``). Binary measures count grade >= 1 as relevant unless the name says
otherwise: TREC-DL's convention is grade >= 2, written ``RR(rel=2)@10``, ``R(rel=2)@100``; nDCG
always uses the graded judgments.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from streamrank.errors import StreamRankError

DEFAULT_MEASURES: tuple[str, ...] = ("nDCG@10", "R@100", "R@1000", "RR@10", "AP")

Run = Mapping[str, Mapping[str, float]]
Qrels = Mapping[str, Mapping[str, int]]


def default_measures(rel_level: int = 1) -> tuple[str, ...]:
    """The measures an eval reports; binary ones at ``rel_level`` (2 for TREC-DL)."""
    if rel_level <= 1:
        return DEFAULT_MEASURES
    rel = f"(rel={rel_level})"
    return ("nDCG@10", f"R{rel}@100", f"R{rel}@1000", f"RR{rel}@10", f"AP{rel}")


def parse_measures(names: Iterable[str]) -> list[Any]:
    """ir_measures measure objects; a StreamRankError names a measure it cannot parse."""
    import ir_measures

    parsed = []
    for name in names:
        try:
            parsed.append(ir_measures.parse_measure(name))
        except (ValueError, NameError, SyntaxError, TypeError) as exc:
            raise StreamRankError(
                f"unknown measure {name!r} ({exc}); use ir_measures names such as nDCG@10"
            ) from exc
    return parsed


def measure_name(name: str) -> str:
    """The name a measure is reported under (``MAP`` -> ``AP``)."""
    return str(parse_measures([name])[0])


def per_query_metrics(
    run: Run, qrels: Qrels, measures: Sequence[str] = DEFAULT_MEASURES
) -> dict[str, dict[str, float]]:
    """Query id -> {measure: value} for every query in ``qrels``; a query the run misses scores 0."""
    import ir_measures

    parsed = parse_measures(measures)
    names = [str(m) for m in parsed]
    scores = {qid: dict.fromkeys(names, 0.0) for qid in qrels}
    judged_run = {
        qid: {d: float(s) for d, s in docs.items()} for qid, docs in run.items() if qid in qrels and docs
    }
    qrels_ = {qid: {d: int(g) for d, g in docs.items()} for qid, docs in qrels.items()}
    if judged_run:
        for metric in ir_measures.iter_calc(parsed, qrels_, judged_run):
            scores[metric.query_id][str(metric.measure)] = float(metric.value)
    return scores


def mean_metrics(per_query: Mapping[str, Mapping[str, float]], measures: Sequence[str]) -> dict[str, float]:
    """The mean of each measure over all queries in ``per_query`` (0.0 when there are none)."""
    names = [measure_name(m) for m in measures]
    n = len(per_query)
    return {name: (sum(q[name] for q in per_query.values()) / n if n else 0.0) for name in names}


def evaluate_run(run: Run, qrels: Qrels, measures: Sequence[str] = DEFAULT_MEASURES) -> dict[str, float]:
    """Mean of each measure over the queries of ``qrels`` (pass only the queries you evaluated)."""
    return mean_metrics(per_query_metrics(run, qrels, measures), measures)


def paired_comparison(
    per_query_a: Mapping[str, Mapping[str, float]],
    per_query_b: Mapping[str, Mapping[str, float]],
    measure: str = "nDCG@10",
) -> dict[str, float]:
    """``b - a`` over the queries both runs scored: mean difference, its standard error, a paired t-test's
    two-sided p, and how many queries went up, down or stayed."""
    import numpy as np
    from scipy.stats import ttest_rel

    shared = sorted(set(per_query_a) & set(per_query_b))
    if not shared:
        raise ValueError("the two runs share no query")
    a = np.array([per_query_a[q][measure] for q in shared])
    b = np.array([per_query_b[q][measure] for q in shared])
    diff = b - a
    p = float(ttest_rel(b, a).pvalue) if len(shared) > 1 and diff.any() else 1.0
    return {
        "queries": len(shared),
        "a": float(a.mean()),
        "b": float(b.mean()),
        "difference": float(diff.mean()),
        "se": float(diff.std(ddof=1) / np.sqrt(len(diff))) if len(diff) > 1 else 0.0,
        "p": p,
        "up": int((diff > 0).sum()),
        "down": int((diff < 0).sum()),
        "same": int((diff == 0).sum()),
    }
