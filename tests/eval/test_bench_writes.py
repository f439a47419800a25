"""`streamrank bench writes` on a tiny corpus: it measures the write path end to end (issue 24)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from streamrank.eval.bench.writes import StandInEncoder, SyntheticCorpus, run_writes_benchmark


def test_the_stand_in_encoder_is_deterministic_and_ranks_shared_words_higher() -> None:
    corpus = SyntheticCorpus(50)
    encoder = StandInEncoder(corpus.words)
    vectors = encoder.encode_tokens(corpus.tokens, corpus.offsets)
    again = StandInEncoder(SyntheticCorpus(50).words).encode([corpus.text(i) for i in range(50)])
    np.testing.assert_allclose(vectors, again, atol=1e-5)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    query = encoder.encode([" ".join(corpus.text(7).split()[:6])])[0]
    assert int(np.argmax(vectors @ query)) == 7  # a document's own words find it


@pytest.mark.slow
def test_a_quick_run_measures_writes_searches_and_compaction(tmp_path: Path) -> None:
    figures = run_writes_benchmark(tmp_path, quick=True, pipelines=["dense"], sizes=[300], peers=[])
    dense = figures["sizes"]["300"]["dense"]
    for key in ("upsert_1", "upsert_100", "delete_1", "upsert_1_concurrent", "search_idle", "search_during_burst",
                "search_idle_paired", "search_after_30pct_deleted", "search_fresh_paired"):
        assert dense[key]["n"] >= 5 and 0 < dense[key]["p50_ms"] <= dense[key]["p99_ms"], key
    assert dense["compaction_s"] > 0 and dense["disk_bytes_after_compaction"] < dense["disk_bytes_before_compaction"]
    assert dense["state"]["masked_rows"] == 0  # compacted
    assert "stand-in" in figures["sizes"]["300"]["encoder"]
