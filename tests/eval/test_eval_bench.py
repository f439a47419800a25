"""`streamrank bench`: registry, lazy import, NAME.json with machine info, printing rules."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from streamrank import cli
from streamrank.errors import StreamRankError
from streamrank.eval import bench


def silent_benchmark(output_dir: Path | None, quick: bool) -> dict[str, Any]:
    return {"quick": quick, "qps": 123.0}


def chatty_benchmark(output_dir: Path | None, quick: bool) -> dict[str, Any]:
    print("my own table")
    return {"qps": 1.0}


def choosy_benchmark(output_dir: Path | None, quick: bool, pipelines: list[str] | None = None) -> dict[str, Any]:
    return {"pipelines": pipelines}


@pytest.fixture
def fakes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(bench.BENCHMARKS, "silent", f"{__name__}:silent_benchmark")
    monkeypatch.setitem(bench.BENCHMARKS, "chatty", f"{__name__}:chatty_benchmark")
    monkeypatch.setitem(bench.BENCHMARKS, "choosy", f"{__name__}:choosy_benchmark")
    monkeypatch.setitem(bench.BENCHMARKS, "absent", "streamrank.no_such_module:run")


def test_run_benchmark_writes_json_with_machine_info(
    fakes: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    payload = bench.run_benchmark("silent", output_dir=tmp_path / "out", quick=True)
    assert json.loads(capsys.readouterr().out) == {"quick": True, "qps": 123.0}, (
        "silent benchmarks get printed"
    )
    saved = json.loads((tmp_path / "out" / "silent.json").read_text())
    assert saved == payload and saved["results"] == {"quick": True, "qps": 123.0}
    assert {"cpu_count", "platform", "python", "torch", "cuda_device", "date"} <= set(saved["machine"])
    assert saved["machine"]["cpu_count"] >= 1


def test_benchmark_that_prints_is_not_printed_again(fakes: None, capsys: pytest.CaptureFixture[str]) -> None:
    bench.run_benchmark("chatty")
    assert capsys.readouterr().out == "my own table\n"


def test_unknown_or_unavailable_benchmark(fakes: None) -> None:
    with pytest.raises(StreamRankError, match=r"unknown benchmark 'nope' \(known: .*kernels.*retrieval"):
        bench.run_benchmark("nope")
    with pytest.raises(StreamRankError, match="'absent' is not available"):
        bench.run_benchmark("absent")


def test_cli_bench(fakes: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["bench", "silent", "--quick", "-o", str(tmp_path)]) == 0
    assert (tmp_path / "silent.json").exists()
    assert cli.main(["bench", "nope"]) == 2
    assert "unknown benchmark" in capsys.readouterr().err


def test_bench_options_reach_only_benchmarks_that_take_them(
    fakes: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["bench", "choosy", "--pipelines", "bm25,/x/hybrid.toml", "-o", str(tmp_path)]) == 0
    saved = json.loads((tmp_path / "choosy.json").read_text())
    assert saved["results"] == {"pipelines": ["bm25", "/x/hybrid.toml"]} and saved["pipelines"] == saved["results"]["pipelines"]
    capsys.readouterr()
    assert cli.main(["bench", "silent", "--pipelines", "bm25"]) == 2
    assert "benchmark 'silent' takes no --pipelines" in capsys.readouterr().err
