"""The eval runner through the real index stages (bm25, dense) on the shared data.

Skipped until `streamrank.index.bm25` / `streamrank.index.dense` exist; then they run as part of the suite.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from streamrank.eval.runner import check_reproducibility, load_table, run_eval

pytestmark = pytest.mark.slow


@pytest.fixture
def shared(datasets_root: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    monkeypatch.setenv("STREAMRANK_DATASETS", str(datasets_root))
    monkeypatch.setenv("STREAMRANK_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("STREAMRANK_OFFLINE", "1")
    return datasets_root


def test_bm25_cisi_retrieval_reuses_its_index(shared: Path, tmp_path: Path) -> None:
    first = run_eval("cisi", "bm25", tmp_path / "a", batch_size=16)
    assert first["queries"] == 76 and 0.25 < first["metrics"]["nDCG@10"] < 0.6
    assert (tmp_path / "home" / "indexes" / "cisi").is_dir()
    again = run_eval("cisi", "bm25", tmp_path / "b", batch_size=16, compare=[tmp_path / "a"])
    assert again["metrics"] == first["metrics"], "same index, same scores"
    assert again["index_seconds"] < max(1.0, first["index_seconds"] / 2), "the existing index is reused"
    lines = (tmp_path / "b" / "run.trec").read_text().splitlines()
    assert len(lines) > 76 * 100 and lines[0].split()[5] == "bm25"
    assert (tmp_path / "b" / "comparison.png").exists()


def test_dense_reranks_dl19_given_candidates(shared: Path, tmp_path: Path) -> None:
    result = run_eval("dl19-passage", "dense", tmp_path / "dl19", limit=8, batch_size=4)
    assert result["queries"] == 8 and result["metrics"]["nDCG@10"] > 0.3
    assert not (tmp_path / "home" / "indexes").exists(), "reranking given passages needs no index"
    per_query = [line.split()[0] for line in (tmp_path / "dl19" / "run.trec").read_text().splitlines()]
    assert len(per_query) == 8 * 100


def test_retrieval_benchmark_quick(shared: Path, tmp_path: Path) -> None:
    from streamrank.eval.bench.retrieval import run_retrieval_benchmark

    figures = run_retrieval_benchmark(tmp_path, quick=True, pipelines=("bm25", "bm25-stored"))
    assert figures["documents"] == 500
    for name in ("bm25", "bm25-stored"):
        row = figures[name]
        assert row["single_qps"] > 0 and row["single_qps_k1000"] > 0
        assert row["batched_qps"] > 0 and row["index_seconds"] > 0


def test_cranfield_rows_reproduce_and_ppr_beats_hybrid_there(shared: Path, tmp_path: Path) -> None:
    """The table's Cranfield rows from scratch (Lucene, MiniLM, the kNN graph); PPR's gain is real there."""
    assert check_reproducibility(only="cranfield", output=tmp_path / "repro") == 0
    rows = json.loads((tmp_path / "repro" / "reproducibility.json").read_text())
    got = {r["pipeline"]: r["got"] for r in rows}
    expected = {r.label: r.expected for r in load_table() if r.dataset == "cranfield"}
    assert set(got) == set(expected) >= {"bm25", "hybrid", "hybrid top 10", "ppr"}
    assert got["ppr"] > got["hybrid"] + 0.01 > got["bm25"]
