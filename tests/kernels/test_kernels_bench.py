"""Smoke run of the kernel benchmark and import of the GPU benchmark script."""

import json

import pytest
import torch

from streamrank.eval.bench.kernels import VARIANTS_CPU, run_kernels_benchmark
from streamrank.stage import BaseStage


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


# --- published-rerankers: logit agreement figures and the resumable evaluation --------------------


def test_published_rerankers_agreement_figures():
    from streamrank.eval.bench import benchmark_function
    from streamrank.eval.bench.published_rerankers import compare_logits

    assert callable(benchmark_function("published-rerankers"))
    dense = torch.tensor([0.0, 3.0, 2.0, 1.0, 5.0])
    same = compare_logits(dense, dense.clone(), [1, 2, 3])
    assert same["cosine"] == 1.0 and same["top1_agree"] and same["identifier_kendall_tau"] == 1.0
    flipped = compare_logits(dense, torch.tensor([0.0, 1.0, 2.0, 3.0, -5.0]), [1, 2, 3])
    assert not flipped["top1_agree"] and not flipped["top_identifier_agree"]
    assert flipped["identifier_kendall_tau"] == -1.0 and flipped["top_identifier_fused"] == 2


class CountWords(BaseStage):
    """Test stage: score = how often the query's words occur in the candidate; counts its runs."""

    runs = 0

    def run(self, rankings):
        type(self).runs += len(rankings)
        out = []
        for ranking in rankings:
            words = ranking.query.text.split()
            scores = [sum(c.document.contents.split().count(w) for w in words) for c in ranking.candidates]
            out.append(ranking.rescored(self.name, scores, keep=self.config.k))
        return out


def test_resumable_eval_checkpoints_every_query(monkeypatch, tmp_path):
    from streamrank import compose as registry
    from streamrank.eval.bench.published_rerankers import resumable_eval
    from streamrank.eval.runner import run_eval

    monkeypatch.setitem(registry.STAGE_KINDS, "countwords", f"{__name__}:CountWords")
    monkeypatch.setenv("STREAMRANK_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("STREAMRANK_DATASETS", str(tmp_path / "data"))
    folder = tmp_path / "data" / "toy"
    (folder / "qrels").mkdir(parents=True)
    docs = {"d1": "apple fruit", "d2": "apple pie", "d3": "car engine", "d4": "ocean water"}
    queries = {"q1": "apple fruit", "q2": "car engine", "q3": "ocean water"}
    lines = lambda rows: "".join(json.dumps(r) + "\n" for r in rows)  # noqa: E731
    (folder / "queries.jsonl").write_text(lines({"_id": q, "text": t} for q, t in queries.items()))
    (folder / "qrels" / "test.tsv").write_text(
        "query-id\tcorpus-id\tscore\nq1\td1\t1\nq2\td3\t1\nq3\td4\t1\n"
    )
    pools = [
        {"query": {"qid": q, "text": text}, "hits": [
            {"qid": q, "docid": d, "rank": i + 1, "score": 0.0, "content": t} for i, (d, t) in enumerate(docs.items())
        ]}
        for q, text in queries.items()
    ]  # fmt: skip
    (folder / "bm25_top100.json").write_text(json.dumps(pools))  # reranking form: no corpus
    pipeline = tmp_path / "pipe.toml"
    pipeline.write_text('name = "pipe"\n[[stages]]\nkind = "countwords"\nk = 10\n')
    out = tmp_path / "run"
    first = resumable_eval("toy", pipeline, out, limit=2)
    assert CountWords.runs == 2 and first["queries"] == 2
    resumed = resumable_eval("toy", pipeline, out)  # the first two come from the checkpoint
    assert CountWords.runs == 3 and len((out / "queries.jsonl").read_text().splitlines()) == 3
    assert resumed["metrics"] == run_eval("toy", pipeline, tmp_path / "plain")["metrics"]
