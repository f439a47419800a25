"""Smoke run of the kernel benchmark and import of the GPU benchmark script."""

import json

import pytest
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


def test_latency_script_variants_agree_on_a_tiny_block():
    """The GPU latency table's four variants compute the same block (Triton through the interpreter)."""
    import os

    assert os.environ.get("TRITON_INTERPRET") == "1"  # tests/conftest.py sets it before triton loads
    from streamrank.eval.bench import kernels_latency as lat
    from streamrank.eval.bench.kernels import BlockShape, _key_mask, make_block

    decoder = make_block(BlockShape("tiny-llama", 64, 96, 4, 2, "silu", gated=True, causal=True))
    encoder = make_block(BlockShape("tiny-bert", 64, 96, 4, 4, "gelu", gated=False, causal=False))
    x = torch.randn(2, 24, 64, generator=torch.Generator().manual_seed(0))
    mask = _key_mask(2, 24, "cpu")
    tiles = {"block_m": 16, "block_n": 16, "ffn_block_m": 16, "ffn_block_f": 32, "ffn_block_n": 32}
    with torch.inference_mode():
        for block, m in ((decoder, None), (encoder, mask)):
            want = lat._forward_fn(block, x, m, "unfused", None)()
            for variant, t in (("unfused_sdpa", None), ("triton", None), ("triton", tiles)):
                got = lat._forward_fn(block, x, m, variant, t)()
                assert (got - want).abs().max() <= 1e-4, (block.shape.name, variant, t)
    assert lat.targets([]) == {
        v: {"worst_latency_vs_sdpa": None, "latency_met": False, "worst_peak_vs_unfused_512": None,
            "memory_met": False}
        for v in ("triton", "triton_tuned")
    }  # fmt: skip


def test_latency_and_kv_benchmarks_are_registered():
    from streamrank.errors import StreamRankError
    from streamrank.eval import bench

    assert callable(bench.benchmark_function("kernels-kv"))
    latency = bench.benchmark_function("kernels-latency")
    if not torch.cuda.is_available():
        with pytest.raises(StreamRankError, match="needs a CUDA device"):
            latency(None, False)
