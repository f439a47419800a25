"""Metrics against hand computations; TREC run files; score ties."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from streamrank.datasets.trec import ranked_scores, read_trec_run, write_trec_run
from streamrank.errors import StreamRankError
from streamrank.eval.metrics import default_measures, evaluate_run, measure_name, per_query_metrics
from streamrank.types import Candidate

QRELS = {"q1": {"d1": 2, "d2": 1, "d3": 0}, "q2": {"x": 1}}
RUN = {"q1": {"d3": 0.9, "d1": 0.8, "d4": 0.7, "d2": 0.6}}


def test_ndcg_at_10_matches_hand_computation() -> None:
    dcg = 0 / math.log2(2) + 2 / math.log2(3) + 0 / math.log2(4) + 1 / math.log2(5)
    idcg = 2 / math.log2(2) + 1 / math.log2(3)
    per_query = per_query_metrics(RUN, QRELS, ["nDCG@10", "RR@10", "R@100", "MAP"])
    assert per_query["q1"]["nDCG@10"] == pytest.approx(dcg / idcg)
    assert per_query["q1"]["RR@10"] == pytest.approx(1 / 2)
    assert per_query["q1"]["AP"] == pytest.approx((1 / 2 + 2 / 4) / 2), "MAP is reported as AP"
    # q2 has qrels but no results: it counts, with 0, in every mean.
    assert per_query["q2"] == {"nDCG@10": 0.0, "RR@10": 0.0, "R@100": 0.0, "AP": 0.0}
    means = evaluate_run(RUN, QRELS, ["nDCG@10", "R@100"])
    assert means == pytest.approx({"nDCG@10": dcg / idcg / 2, "R@100": 0.5})


def test_graded_threshold_measures() -> None:
    assert default_measures(1) == ("nDCG@10", "R@100", "R@1000", "RR@10", "AP")
    assert default_measures(2) == ("nDCG@10", "R(rel=2)@100", "R(rel=2)@1000", "RR(rel=2)@10", "AP(rel=2)")
    only_q1 = {"q1": QRELS["q1"]}
    result = evaluate_run(RUN, only_q1, ["RR(rel=2)@10", "R(rel=2)@100", "RR@10"])
    assert result == pytest.approx({"RR(rel=2)@10": 0.5, "R(rel=2)@100": 1.0, "RR@10": 0.5})
    run = {"q1": {"d2": 1.0, "d1": 0.5}}
    assert evaluate_run(run, only_q1, ["RR(rel=2)@10", "RR@10"]) == pytest.approx(
        {"RR(rel=2)@10": 0.5, "RR@10": 1.0}
    )


def test_bad_measure_and_empty_run() -> None:
    with pytest.raises(StreamRankError, match="unknown measure 'nDGC@x'"):
        evaluate_run(RUN, QRELS, ["nDGC@x"])
    assert evaluate_run({}, QRELS, ["nDCG@10"]) == {"nDCG@10": 0.0}
    assert evaluate_run({"q1": {}}, {}, ["nDCG@10"]) == {"nDCG@10": 0.0}
    assert measure_name("MAP") == "AP"


def test_ranked_scores_keep_the_pipeline_order() -> None:
    sorted_ = [Candidate("a", 3.0), Candidate("b", 2.0), Candidate("a", 1.0)]
    assert ranked_scores(sorted_) == [("a", 3.0), ("b", 2.0)], "duplicates keep their first position"
    tied = [Candidate("z", 1.0), Candidate("a", 1.0), Candidate("m", 5.0)]
    assert ranked_scores(tied) == [("z", 3.0), ("a", 2.0), ("m", 1.0)]


def test_trec_run_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "run.trec"
    write_trec_run(path, {"q1": [("d1", 0.1 + 0.2), ("d2", 1e-9)], "q2": []}, tag="my run")
    lines = path.read_text().splitlines()
    assert lines[0].split() == ["q1", "Q0", "d1", "1", repr(0.1 + 0.2), "my_run"]
    assert read_trec_run(path) == {"q1": [("d1", 1, 0.1 + 0.2), ("d2", 2, 1e-9)]}
    path.write_text("q1 Q0 d1\n")
    with pytest.raises(ValueError, match="expected `qid Q0 docid rank score"):
        read_trec_run(path)


def test_paired_comparison_over_shared_queries(tmp_path) -> None:
    import json
    import subprocess
    import sys

    from scipy.stats import ttest_rel

    from streamrank.eval.metrics import paired_comparison

    a = {"q1": {"nDCG@10": 0.2}, "q2": {"nDCG@10": 0.5}, "q3": {"nDCG@10": 0.9}, "only-a": {"nDCG@10": 1.0}}
    b = {"q1": {"nDCG@10": 0.4}, "q2": {"nDCG@10": 0.5}, "q3": {"nDCG@10": 1.0}}
    c = paired_comparison(a, b)
    assert c["queries"] == 3 and (c["up"], c["down"], c["same"]) == (2, 0, 1)
    assert abs(c["difference"] - 0.1) < 1e-9
    assert abs(c["p"] - ttest_rel([0.4, 0.5, 1.0], [0.2, 0.5, 0.9]).pvalue) < 1e-12
    for name, run in (("a", a), ("b", b)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "per_query.json").write_text(json.dumps(run))
    out = subprocess.run(
        [sys.executable, "-m", "streamrank", "compare", str(tmp_path / "a"), str(tmp_path / "b"), "--json"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert json.loads(out.stdout)["up"] == 2
    bad = subprocess.run([sys.executable, "-m", "streamrank", "compare", str(tmp_path), str(tmp_path / "b")],
                         capture_output=True, text=True)  # fmt: skip
    assert bad.returncode != 0 and "per_query.json" in bad.stderr and "Traceback" not in bad.stderr
