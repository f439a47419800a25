"""The published-reranker table, configs and the one-command reproduction script."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from streamrank.compose import load_pipeline
from streamrank.eval.runner import load_table

REPO = Path(__file__).resolve().parents[2]
TABLE = REPO / "eval" / "reproducibility-published.toml"


def test_published_configs_load_and_name_hub_checkpoints() -> None:
    configs = sorted((REPO / "configs" / "published").glob("*.toml"))
    assert len(configs) == 5
    models = set()
    for path in configs:
        stage = load_pipeline(path).stages[-1]
        cfg = stage.config
        models.add(getattr(cfg, "model", None) or cfg.llm.model)
        assert cfg.depth == 100
    assert models == {
        "castorini/first_mistral",
        "castorini/rank_zephyr_7b_v1_full",
        "Alibaba-NLP/E2Rank-0.6B",
        "Qwen/Qwen3-Reranker-0.6B",
        "cross-encoder/ms-marco-MiniLM-L6-v2",
    }


def test_published_table_rows_point_at_published_configs() -> None:
    rows = load_table(TABLE)
    expected = {(r.dataset, Path(r.pipeline).stem): r.expected for r in rows}
    assert expected[("dl19-passage", "first-mistral")] == 0.7294
    assert expected[("dl20-passage", "rank-zephyr")] == 0.7080
    assert expected[("dl19-passage", "e2rank-0_6b")] == 0.7084
    assert expected[("dl19-passage", "cross-encoder-minilm-l6")] == 0.7430
    for row in rows:
        assert row.skip_unavailable and row.note
        assert Path(row.pipeline).exists() or (REPO / "configs" / f"{row.pipeline}.toml").exists()


def test_check_skips_rows_whose_model_cannot_be_had(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str], datasets_root: Path
) -> None:
    from streamrank.eval.runner import check_reproducibility

    monkeypatch.setenv("STREAMRANK_OFFLINE", "1")
    monkeypatch.setenv("STREAMRANK_MODELS", str(tmp_path))
    assert check_reproducibility(TABLE, only="cross-encoder", limit=1) == 0
    out = capsys.readouterr()
    assert "SKIP" in out.out and "1 skipped" in out.out
    assert "cross-encoder/ms-marco-MiniLM-L6-v2" in out.err and "make models" in out.err


@pytest.mark.slow
def test_gpu_script_runs_end_to_end_on_cpu_with_tiny_models(tmp_path: Path, datasets_root: Path) -> None:
    """eval/gpu/reproduce.sh with tiny random stand-ins (60-90 s on 2 idle cores): every DL19 row runs
    (scores meaningless), DL20 rows are skipped (no DL20 here), the kernel table is in the report."""
    env = {**os.environ, "REPRODUCE_TINY": "1", "REPRODUCE_LIMIT": "1"}
    env.pop("STREAMRANK_MODELS", None)
    done = subprocess.run(
        ["bash", str(REPO / "eval" / "gpu" / "reproduce.sh"), str(tmp_path / "out")],
        env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    report = (tmp_path / "out" / "report.md").read_text()
    rows = [line for line in report.splitlines() if line.startswith("| dl")]
    assert len(rows) == 8, report
    assert not any("ERROR" in r for r in rows), report + done.stderr
    assert all(("SKIP" in r) == r.startswith("| dl20") for r in rows), report
    assert "| shape | seq | batch |" in report
    assert "CPU smoke run" in report
