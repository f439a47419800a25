"""`streamrank bench soak`: closed-loop clients against a real server while its memory is sampled."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from test_service_support import build_index, fake_server, register, write_pipeline

from streamrank.eval.bench.soak import rss_bytes, soak


def sane(report: dict) -> None:
    assert report["errors"] == 0, report["first_error"]
    assert report["requests"] > 0 and report["throughput_qps"] > 0
    assert 0 < report["p50_ms"] <= report["p95_ms"] <= report["p99_ms"]
    samples = report["rss_samples"]
    assert len(samples) > 1 and [t for t, _ in samples] == sorted(t for t, _ in samples)
    assert 0 < report["rss_start_mb"] <= report["rss_peak_mb"] and report["rss_end_mb"] <= report["rss_peak_mb"]
    assert report["rss_start_mb"] == samples[0][1] and report["rss_end_mb"] == samples[-1][1]
    expected = (report["rss_end_mb"] - report["rss_start_mb"]) / report["rss_start_mb"] * 100
    assert report["rss_growth_pct"] == pytest.approx(expected, abs=0.01)
    assert report["met"] == (report["rss_growth_pct"] < 10 and report["errors"] == 0)


def test_rss_of_this_process() -> None:
    import os

    assert rss_bytes(os.getpid()) > 10 * 2**20


def test_soak_against_a_fake_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    register(monkeypatch)
    fake = write_pipeline(tmp_path, "fake")
    build_index(fake, tmp_path / "index")
    config = tmp_path / "service.toml"
    config.write_text(f'pipelines = ["{fake}"]\nindex_dir = "{tmp_path / "index"}"\nwarmup = false\nlog_level = "warning"\n')
    with fake_server(config) as server:
        server.wait_ready()
        report = asyncio.run(
            soak(server.url, server.proc.pid, ["vitamin bone", "sleep memory"], clients=8, seconds=2.0,
                 warmup_seconds=0.5, sample_seconds=0.2)
        )
    sane(report)
    assert report["clients"] == 8 and report["warmup"]["requests"] > 0 and report["rss_baseline"] == "end of the warm-up"


@pytest.mark.slow
def test_quick_soak_benchmark_writes_its_report(datasets_root: Path, tmp_path: Path) -> None:
    from streamrank.eval.bench import run_benchmark

    payload = run_benchmark("soak", output_dir=tmp_path, quick=True)
    report = json.loads((tmp_path / "soak.json").read_text())["results"]
    assert report == json.loads(json.dumps(payload["results"]))
    sane(report)
    assert report["pipeline"] == "bm25" and report["clients"] == 8 and report["seconds"] > 0
    table = (tmp_path / "soak.md").read_text()
    assert "| requests | errors |" in table and f"| {report['requests']} | 0 |" in table
