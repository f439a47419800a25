"""Smoke run of the kernel benchmark and import of the GPU benchmark script."""

import json

import torch

from streamrank.eval.bench.kernels import VARIANTS_CPU, run_kernels_benchmark


def test_quick_benchmark_writes_json(tmp_path, capsys):
    threads = torch.get_num_threads()
    result = run_kernels_benchmark(tmp_path, quick=True)
    assert torch.get_num_threads() == threads
    saved = json.loads((tmp_path / "kernels.json").read_text())
    assert saved["rows"] == result["rows"]
    assert {(r["shape"], r["variant"]) for r in saved["rows"]} == {
        (shape, v) for shape in ("minilm", "smollm2") for v in VARIANTS_CPU
    }
    for row in saved["rows"]:
        assert row["peak_mib"] > 0 and row["latency_ms"] > 0
        if row["variant"] != "dense":
            assert row["max_abs_err_vs_unfused"] <= 1e-4
    assert "mem/unfused" in capsys.readouterr().out


def test_gpu_script_imports_without_cuda():
    from streamrank.eval.bench import kernels_gpu

    assert "triton" in kernels_gpu.VARIANTS_GPU and callable(kernels_gpu.main)
