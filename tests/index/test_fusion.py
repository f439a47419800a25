"""Fusion: the pure functions over runs (rrf, minmax, zscore, PPR fusion) and the fusion stage."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from index_support import HYBRID, search, write_pipeline

from streamrank import compose as registry
from streamrank.compose import build_stage, load_pipeline
from streamrank.context import PipelineContext
from streamrank.errors import ConfigError
from streamrank.index.base import IndexedRetriever
from streamrank.index.fusion import FusionStage
from streamrank.index.scores import fuse, fuse_with_ppr
from streamrank.models import MINILM
from streamrank.pipeline import Pipeline
from streamrank.stage import BaseStage, StageConfig
from streamrank.types import Candidate, Document, Query, Ranking


# ---- fusion --------------------------------------------------------------------------------------
class FixedConfig(StageConfig):
    hits: list[tuple[str, float]]


class Fixed(BaseStage):
    """Test retriever: returns a fixed list (or, given a pool, the pool members in that list)."""

    Config = FixedConfig

    def run(self, rankings: Sequence[Ranking]) -> list[Ranking]:
        out = []
        for r in rankings:
            hits = dict(self.config.hits)
            pool = r.candidates or [Candidate(d, 0.0) for d in hits]
            out.append(r.rescored(self.name, hits, keep=self.config.k, candidates=pool))
        return out


@pytest.fixture
def fixed_kind(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(registry.STAGE_KINDS, "fixed", f"{__name__}:Fixed")


def fusion(options: dict[str, Any]) -> FusionStage:
    return build_stage({"kind": "fusion", **options}, PipelineContext(None), "test")  # type: ignore[return-value]


A = [("a", 9.0), ("b", 5.0), ("c", 1.0)]
B = [("c", 0.9), ("d", 0.8), ("a", 0.1)]


def test_rrf_matches_hand_computation(fixed_kind: None) -> None:
    stage = fusion(
        {
            "retrievers": [
                {"kind": "fixed", "name": "one", "hits": A},
                {"kind": "fixed", "name": "two", "hits": B},
            ]
        }
    )
    ranked = stage.run([Ranking(query=Query("q", "x"))])[0]
    expected = {"a": 1 / 61 + 1 / 63, "b": 1 / 62, "c": 1 / 63 + 1 / 61, "d": 1 / 62}
    assert ranked.doc_ids() == ["a", "c", "b", "d"]  # ties broken by doc id, as pyserini
    for cand in ranked.candidates:
        assert cand.score == pytest.approx(expected[cand.doc_id])
        assert cand.stage_scores["fusion"] == pytest.approx(expected[cand.doc_id])
    by_id = {c.doc_id: c for c in ranked.candidates}
    assert by_id["a"].stage_scores["one"] == 9.0 and by_id["a"].stage_scores["two"] == 0.1
    assert "two" not in by_id["b"].stage_scores
    assert {"one", "two"} <= set(ranked.timings_ms)
    assert [c.doc_id for c in stage.children[0].run([Ranking(query=Query("q", "x"))])[0].candidates] == [
        "a",
        "b",
        "c",
    ]


def test_rrf_k_and_weights() -> None:
    fused = fuse([A, B], "rrf", rrf_k=0, weights=[2.0, 1.0])
    assert fused == pytest.approx({"a": 2 / 1 + 1 / 3, "b": 2 / 2, "c": 2 / 3 + 1 / 1, "d": 1 / 2})


def test_minmax_and_zscore_by_hand() -> None:
    minmax = fuse([A, B], "minmax")
    assert minmax == pytest.approx({"a": 1.0 + 0.0, "b": 0.5, "c": 0.0 + 1.0, "d": 0.875})
    za = {"a": 1.2247449, "b": 0.0, "c": -1.2247449}  # (s - mean) / population std
    zb = dict(zip("cda", np.array([0.9, 0.8, 0.1]) - 0.6, strict=True))
    zb = {k: v / float(np.std([0.9, 0.8, 0.1])) for k, v in zb.items()}
    z = fuse([A, B], "zscore")
    assert z["a"] == pytest.approx(za["a"] + zb["a"])
    assert z["b"] == pytest.approx(za["b"] + min(zb.values()))  # missing: the run's lowest z
    assert z["d"] == pytest.approx(min(za.values()) + zb["d"])


def test_fusion_scores_a_supplied_pool_only(fixed_kind: None) -> None:
    stage = fusion(
        {
            "retrievers": [
                {"kind": "fixed", "name": "one", "hits": A},
                {"kind": "fixed", "name": "two", "hits": B},
            ]
        }
    )
    pool = [Candidate("b", 0.0), Candidate("d", 0.0)]
    ranked = stage.run([Ranking(query=Query("q", "x"), candidates=pool)])[0]
    assert sorted(ranked.doc_ids()) == ["b", "d"]


def test_fusion_config_errors(fixed_kind: None) -> None:
    with pytest.raises(ConfigError, match="2 weights for 1 retrievers"):
        fusion({"retrievers": [{"kind": "fixed", "hits": A}], "weights": [1, 2]})
    with pytest.raises(ConfigError, match="unique"):
        fusion({"retrievers": [{"kind": "fixed", "hits": A}, {"kind": "fixed", "hits": B}]})
    with pytest.raises(ConfigError, match="unknown key 'nope'"):
        fusion({"retrievers": [{"kind": "fixed", "hits": A, "nope": 1}]})


def test_hybrid_pipeline_fuses_bm25_and_dense(
    copy_dir: Path, tmp_path: Path, minilm: Any, docs: list[Document]
) -> None:
    pipeline = load_pipeline(write_pipeline(tmp_path, HYBRID), index_dir=copy_dir)
    pipeline.context.shared(("sentence-encoder", MINILM), lambda: minilm)
    assert [s.name for s in pipeline.iter_stages()] == ["fusion", "bm25", "dense"]
    ranking = pipeline.search(docs[30].title, k=10)
    assert ranking.candidates[0].doc_id == docs[30].id
    assert {"fusion", "bm25", "dense"} <= set(ranking.timings_ms)
    bm = {
        c.doc_id: r
        for r, c in enumerate(search(pipeline.stages[0].children[0], docs[30].title)[0].candidates, 1)
    }
    de = {
        c.doc_id: r
        for r, c in enumerate(search(pipeline.stages[0].children[1], docs[30].title)[0].candidates, 1)
    }
    for cand in ranking.candidates:
        expected = sum(1 / (60 + ranks[cand.doc_id]) for ranks in (bm, de) if cand.doc_id in ranks)
        assert cand.score == pytest.approx(expected)
    pipeline.close()


def test_shipped_configs_load(tmp_path: Path) -> None:
    for name in ("bm25", "dense", "hybrid"):
        pipeline = load_pipeline(name, index_dir=tmp_path / name)
        assert isinstance(pipeline, Pipeline)
        assert isinstance(pipeline.stages[0], IndexedRetriever | FusionStage)  # a retriever first


def test_fusion_methods() -> None:
    rank = np.array([1.0, 2.0, np.nan])
    score = np.array([0.9, 0.5, np.nan])
    ppr = np.array([0.01, 0.2, 0.1])
    rrf = fuse_with_ppr(rank, score, ppr, method="rrf", weight=0.5)
    assert rrf[1] > rrf[0] > rrf[2] > 0
    assert list(fuse_with_ppr(rank, score, ppr, method="ppr_only", weight=0.5)) == list(ppr)
    interp = fuse_with_ppr(rank, score, ppr, method="interpolate", weight=0.0)
    assert list(interp) == [1.0, 0.0, 0.0]


# ---- serving depth ---------------------------------------------------------------------------------
class DepthRecorder(Fixed):
    """Fixed, but ``run_top`` serves only its best ``k`` and records the depths it was asked for."""

    asked: list[int | None]

    def run(self, rankings: Sequence[Ranking]) -> list[Ranking]:
        self.asked.append(None)
        return super().run(rankings)

    def run_top(self, rankings: Sequence[Ranking], k: int) -> list[Ranking]:
        self.asked.append(k)
        return [r.top_k(k) for r in super().run(rankings)]


@pytest.fixture
def recorder_kind(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(registry.STAGE_KINDS, "recorder", f"{__name__}:DepthRecorder")
    monkeypatch.setattr(DepthRecorder, "asked", [], raising=False)


LONG_A = [(f"a{i}", 100.0 - i) for i in range(30)]
LONG_B = [(f"b{i}", 100.0 - i) for i in range(30)]


def test_serving_a_top_k_searches_serve_depth_deep(recorder_kind: None) -> None:
    options = {
        "retrievers": [
            {"kind": "recorder", "name": "one", "hits": LONG_A},
            {"kind": "recorder", "name": "two", "hits": LONG_B},
        ]
    }
    query = [Ranking(query=Query("q", "x"))]
    served = fusion({**options, "serve_depth": 5}).run_top(query, 3)[0]
    assert DepthRecorder.asked == [5, 5]  # max(k, serve_depth) asked of each retriever
    assert len(served.candidates) == 10  # the union of two 5-deep lists
    full = fusion(options).run(query)[0]
    assert DepthRecorder.asked[2:] == [None, None]  # full depth (evaluation) is untouched
    assert served.doc_ids()[:3] == full.doc_ids()[:3]
    fusion({**options, "serve_depth": 5}).run_top(query, 8)
    assert DepthRecorder.asked[4:] == [8, 8]  # a request deeper than serve_depth gets its k
    with pytest.raises(ConfigError, match="serve_depth"):
        fusion({**options, "serve_depth": 0})


def test_hybrid_serving_depth_on_real_indexes(
    copy_dir: Path, tmp_path: Path, minilm: Any, docs: list[Document]
) -> None:
    """A request's top 10 is RRF over each retriever's top serve_depth; at a depth >= the retrievers' k it
    equals the top 10 of the full-depth run."""
    exact = HYBRID.replace('kind = "fusion"\nk = 50', 'kind = "fusion"\nk = 50\nserve_depth = 50')
    shallow = HYBRID.replace('kind = "fusion"\nk = 50', 'kind = "fusion"\nk = 50\nserve_depth = 12')
    assert exact != HYBRID and shallow != HYBRID
    query = docs[7].title
    rankings: dict[str, list[str]] = {}
    for name, body in (("exact", exact), ("shallow", shallow)):
        folder = tmp_path / name
        folder.mkdir()
        pipeline = load_pipeline(write_pipeline(folder, body), index_dir=copy_dir)
        pipeline.context.shared(("sentence-encoder", MINILM), lambda: minilm)
        rankings[name] = pipeline.search(query, k=10).doc_ids()
        full = pipeline.run([Ranking(query=Query("q", query))])[0]
        if name == "exact":
            assert rankings[name] == full.doc_ids()[:10]
        else:
            bm25, dense = pipeline.stages[0].children
            lists = [
                [(c.doc_id, c.score) for c in search(stage, query)[0].candidates[:12]]
                for stage in (bm25, dense)
            ]
            fused = fuse(lists, "rrf", rrf_k=60)
            expected = sorted(fused, key=lambda d: (-fused[d], d))[:10]
            assert rankings[name] == expected
        pipeline.close()


# ---- score fusion (a reranker fused with its first stage) ----------------------------------------
CHAINED = """
[[stages]]
kind = "bm25"
k = 50

[[stages]]
kind = "dense"
k = 50

[[stages]]
kind = "score_fusion"
stages = ["bm25", "dense"]
{extra}
"""


def test_score_fusion_fuses_the_scores_earlier_stages_gave(
    copy_dir: Path, tmp_path: Path, minilm: Any, docs: list[Document]
) -> None:
    """BM25's list, rescored by dense, then RRF (and minmax) of the two stages' scores, as fuse() computes them."""
    query = docs[12].title
    for method in ("rrf", "minmax"):
        folder = tmp_path / method
        folder.mkdir()
        pipeline = load_pipeline(
            write_pipeline(folder, CHAINED.format(extra=f'method = "{method}"')), index_dir=copy_dir
        )
        pipeline.context.shared(("sentence-encoder", MINILM), lambda: minilm)
        bm25_list = search(pipeline.stages[0], query)[0]
        rescored = pipeline.run([Ranking(query=Query("q", query))], stages=slice(0, 2))[0]
        ranking = pipeline.run([Ranking(query=Query("q", query))])[0]
        runs = [
            [(c.doc_id, c.score) for c in bm25_list.candidates],
            [(c.doc_id, c.score) for c in rescored.candidates],
        ]
        expected = fuse(runs, method, rrf_k=60)
        assert {c.doc_id for c in ranking.candidates} == {c.doc_id for c in bm25_list.candidates}
        for cand in ranking.candidates:
            assert cand.score == pytest.approx(expected[cand.doc_id])
            assert set(cand.stage_scores) == {"bm25", "dense", "score_fusion"}
        assert ranking.doc_ids() == sorted(expected, key=lambda d: (-expected[d], d))
        assert ranking.candidates[0].doc_id == docs[12].id
        pipeline.close()


def test_score_fusion_names_must_be_earlier_stages(tmp_path: Path) -> None:
    body = CHAINED.replace('stages = ["bm25", "dense"]', 'stages = ["bm25", "e2rank"]').format(extra="")
    with pytest.raises(
        ConfigError, match=r"reads the scores of \['e2rank'\].*earlier stages: \['bm25', 'dense'\]"
    ):
        load_pipeline(write_pipeline(tmp_path, body), index_dir=tmp_path / "index")
    with pytest.raises(ConfigError, match="2 weights for 3 stages"):
        load_pipeline(
            write_pipeline(
                tmp_path,
                CHAINED.replace('["bm25", "dense"]', '["bm25", "dense", "bm25"]').format(
                    extra="weights = [1, 2]"
                ),
            ),
            index_dir=tmp_path / "index",
        )
    nested = HYBRID + '\n[[stages]]\nkind = "score_fusion"\nstages = ["fusion", "dense"]\n'
    assert load_pipeline(write_pipeline(tmp_path, nested), index_dir=tmp_path / "index").stages[
        1
    ].reads_scores_of() == [
        "fusion",
        "dense",
    ]  # a fusion's retrievers count as earlier stages
