"""Published-reranker checks on real weights: the fused low-rank path against the dense model, and
resumable quality runs of LLM reranking pipelines.

``streamrank bench published-rerankers [--model M] [--quick] [--output DIR]`` (default model
``Qwen/Qwen2.5-Coder-0.5B-Instruct``, loaded in float32): on the FIRST prompts of the first DL19
queries over their BM25 top-20 (one window each), the dense model's last-position logits against the
same model compressed at :data:`RATIO` (plain SVD, then the whitened SVD calibrated on SciFact
passages) on the fused path (rank-space attention and FFN, torch backend): cosine over the whole
vocabulary, top-1 token agreement, the identifiers' order (Kendall tau, top identifier agreement);
on the first prompt, the fused path against the unfused low-rank model (same factors: what the kernels
must reproduce) and prefix reuse on the fused path (instruction + query cached in the rank-space KV
cache, the window continued from it) against the fused full recompute; and seconds per 20-passage
window. ``python -m streamrank.eval.bench.published_rerankers parity --model M --queries N --methods svd``
runs it with fewer prompts or methods (the 1.5B model on a CPU). Torch threads: ``$STREAMRANK_BENCH_THREADS`` (default 1).

``python -m streamrank.eval.bench.published_rerankers eval --dataset D --pipeline P --output DIR
[--limit N]``: ``streamrank eval`` one query at a time, each query's ranking appended to
``DIR/queries.jsonl`` as it finishes, so a run stopped anywhere resumes where it was (LLM reranking on
a CPU takes tens of seconds a window); at the end ``DIR/metrics.json`` as ``streamrank eval`` writes it.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

DEFAULT_MODEL = "Qwen/Qwen2.5-Coder-0.5B-Instruct"
RATIO = 0.8
WINDOW = 20
PASSAGE_TOKENS = 100
QUERIES = 3
METHODS = ("svd", "whitened")
CALIBRATION_TEXTS = 32
"""SciFact passages of the whitened (activation-aware) SVD's calibration (cut to 256 tokens each)."""


def _threads() -> int:
    return int(os.environ.get("STREAMRANK_BENCH_THREADS", "1"))


def _prompts(llm: Any, queries: int, window: int) -> list[Any]:
    """FIRST prompts (one window of the BM25 top-``window``) of the first ``queries`` DL19 queries."""
    from streamrank.datasets import load_dataset
    from streamrank.eval.bench.rerank import DATASET
    from streamrank.rankers.causal_lm_loading import LLMSettings
    from streamrank.rankers.prompts import PromptBuilder

    data = load_dataset(DATASET)
    pools = data.candidates("test") or {}
    builder = PromptBuilder(llm, LLMSettings(max_passage_tokens=PASSAGE_TOKENS))
    prompts = []
    for query in [q for q in data.queries("test") if len(pools.get(q.id, ())) >= window][:queries]:
        texts = [c.document.contents if c.document else "" for c in pools[query.id][:window]]
        prompts.append(builder.listwise(query.text, texts))
    return prompts


def _last_logits(llm: Any, ids: list[int], prefix: Any = None) -> tuple[Any, float]:
    started = time.perf_counter()
    rows = llm.logits_at([ids], [[len(ids) - 1]], prefix=prefix).rows
    return rows[0][0], time.perf_counter() - started


def _kendall(a: list[float], b: list[float]) -> float:
    from scipy.stats import kendalltau

    return float(kendalltau(a, b).statistic)


def compare_logits(dense: Any, fused: Any, label_ids: list[int]) -> dict[str, Any]:
    """Agreement of two last-position logit vectors: whole vocabulary and the identifiers' order."""
    import torch

    d, f = dense.double(), fused.double()
    di, fi = d[label_ids], f[label_ids]
    return {
        "cosine": round(float(torch.nn.functional.cosine_similarity(d, f, dim=0)), 6),
        "top1_agree": int(d.argmax()) == int(f.argmax()),
        "top_identifier_agree": int(di.argmax()) == int(fi.argmax()),
        "identifier_kendall_tau": round(_kendall(di.tolist(), fi.tolist()), 4),
        "identifier_max_abs_diff": round(float((di - fi).abs().max()), 4),
        "top_identifier_dense": int(di.argmax()),
        "top_identifier_fused": int(fi.argmax()),
    }


def _variant(
    llm: Any, prompts: list[Any], dense: list[tuple[Any, float]], method: str, calibration: list[str] | None
) -> dict[str, Any]:
    """Compress ``llm`` in place by ``method`` at :data:`RATIO`; fused vs dense, fused vs unfused, prefix reuse."""
    from streamrank.kernels import ops
    from streamrank.kernels.lowrank import apply_lowrank, set_backend
    from streamrank.rankers.kv import PrefixCache

    started = time.perf_counter()
    apply_lowrank(
        llm.model,
        ratio=RATIO,
        backend="torch",
        method=method,
        calibration_texts=calibration,
        tokenizer=llm.tokenizer,
    )
    compress_seconds = time.perf_counter() - started
    rows = []
    for n, (prompt, (dense_logits, dense_seconds)) in enumerate(zip(prompts, dense, strict=True)):
        labels = list(prompt.label_ids)
        with ops.trace() as calls:
            fused, fused_seconds = _last_logits(llm, list(prompt.ids))
        row: dict[str, Any] = {
            "prompt_tokens": len(prompt.ids),
            "dense_seconds": round(dense_seconds, 2),
            "fused_seconds": round(fused_seconds, 2),
            "fell_back_to_hf_attention": calls[("llama_attention", "hf")],
            **compare_logits(dense_logits, fused, labels),
        }
        if n == 0:  # the exactness checks, on the first prompt (each costs a forward)
            prefix = PrefixCache(llm, list(prompt.prefix))
            reused, reuse_seconds = _last_logits(llm, list(prompt.body), prefix=prefix)
            set_backend(llm.model, "unfused")
            unfused, unfused_seconds = _last_logits(llm, list(prompt.ids))
            set_backend(llm.model, "torch")
            row |= {
                "prefix_tokens": prefix.length,
                "prefix_cache": type(prefix.cache).__name__,
                "fused_body_seconds_after_prefix": round(reuse_seconds, 2),
                "unfused_lowrank_seconds": round(unfused_seconds, 2),
                "fused_vs_unfused_max_abs_diff": float((fused - unfused).abs().max()),
                "prefix_reuse_max_abs_diff": float((reused - fused).abs().max()),
                "prefix_reuse_identifier_max_abs_diff": float((reused[labels] - fused[labels]).abs().max()),
            }
        rows.append(row)
        print(method, json.dumps(row), flush=True)

    def mean(key: str) -> float:
        return round(sum(float(r[key]) for r in rows) / len(rows), 4)

    return {
        "method": method,
        "calibration_texts": len(calibration or ()),
        "compress_seconds": round(compress_seconds, 1),
        "prompts": rows,
        "summary": {
            "cosine_mean": mean("cosine"),
            "top1_agreement": mean("top1_agree"),
            "top_identifier_agreement": mean("top_identifier_agree"),
            "identifier_kendall_tau_mean": mean("identifier_kendall_tau"),
            "fused_vs_unfused_max_abs_diff": rows[0]["fused_vs_unfused_max_abs_diff"],
            "prefix_reuse_max_abs_diff": rows[0]["prefix_reuse_max_abs_diff"],
            "dense_seconds_per_window": mean("dense_seconds"),
            "fused_seconds_per_window": mean("fused_seconds"),
        },
    }


def run_published_rerankers_benchmark(
    output_dir: Path | None = None,
    quick: bool = False,
    model: str = DEFAULT_MODEL,
    queries: int = QUERIES,
    methods: tuple[str, ...] = METHODS,
) -> dict[str, Any]:
    """Dense vs fused low-rank logits (``methods``: plain and whitened SVD), prefix reuse, seconds per window."""
    import torch

    from streamrank.kernels.calibrate import load_texts
    from streamrank.rankers.causal_lm_loading import LLMSettings, load_causal_lm

    torch.set_num_threads(_threads())
    settings = LLMSettings(model=model, dtype="float32")
    started = time.perf_counter()
    llm = load_causal_lm(settings, "cpu")
    load_seconds = time.perf_counter() - started
    window = 5 if quick else WINDOW
    prompts = _prompts(llm, 1 if quick else queries, window)
    dense = []
    for prompt in prompts:
        logits, seconds = _last_logits(llm, list(prompt.ids))
        dense.append((logits, seconds))
        print(f"dense window: {len(prompt.ids)} tokens, {seconds:.1f} s", flush=True)
    variants = []
    for method in methods[:1] if quick else methods:
        if variants:  # a fresh dense model for the next compression
            del llm
            llm = load_causal_lm(settings, "cpu")
        texts = load_texts("auto", 4 if quick else CALIBRATION_TEXTS) if method == "whitened" else None
        variants.append(_variant(llm, prompts, dense, method, texts))
        print(json.dumps(variants[-1]["summary"]), flush=True)
    return {
        "model": model,
        "dtype": "float32",
        "ratio": RATIO,
        "window": window,
        "max_passage_tokens": PASSAGE_TOKENS,
        "threads": _threads(),
        "load_seconds": round(load_seconds, 1),
        "variants": variants,
    }


# ---- resumable evaluation ------------------------------------------------------------------------
def resumable_eval(
    dataset: str, pipeline: str | Path, output: Path, limit: int | None = None, split: str = "test"
) -> dict[str, Any]:
    """``streamrank eval`` one query at a time with a per-query checkpoint (see the module docstring)."""
    import torch

    from streamrank.compose import load_pipeline
    from streamrank.datasets import load_dataset
    from streamrank.eval.metrics import default_measures, mean_metrics, per_query_metrics
    from streamrank.eval.runner import _candidate_pools, _ensure_index, _initial_rankings, rank_run

    torch.set_num_threads(_threads())
    output.mkdir(parents=True, exist_ok=True)
    checkpoint = output / "queries.jsonl"
    done: dict[str, dict[str, Any]] = {}
    if checkpoint.exists():
        for line in checkpoint.read_text().splitlines():
            if line.strip():
                record = json.loads(line)
                done[record["query"]] = record
    data = load_dataset(dataset)
    queries = data.queries(split)[: limit if limit else None]
    pipe = load_pipeline(pipeline, corpus=str(dataset) if data.has_corpus else "")
    excluded = data.excluded_ids(split)
    try:
        _ensure_index(pipe)
        rankings = _initial_rankings(queries, _candidate_pools(data, split, None, pipe))
        with checkpoint.open("a") as out:
            for ranking in rankings:
                if ranking.query.id in done:
                    continue
                began = time.perf_counter()
                run, _, _, calls = rank_run(pipe, [ranking], 1, excluded)
                record = {
                    "query": ranking.query.id,
                    "run": run.get(ranking.query.id, []),
                    "seconds": round(time.perf_counter() - began, 2),
                    "calls": calls,
                }
                out.write(json.dumps(record) + "\n")
                out.flush()
                done[record["query"]] = record
                print(f"{len(done)}/{len(rankings)} {record['query']} {record['seconds']} s", flush=True)
        name = pipe.name
    finally:
        pipe.close()
    measures = default_measures(data.rel_level)
    judged = data.qrels(split)
    ids = [r.query.id for r in rankings]
    per_query = per_query_metrics(
        {qid: dict(done[qid]["run"]) for qid in ids}, {q.id: judged[q.id] for q in queries}, measures
    )
    seconds = [done[qid]["seconds"] for qid in ids]
    result = {
        "dataset": data.name,
        "pipeline": name,
        "split": split,
        "queries": len(queries),
        "metrics": mean_metrics(per_query, measures),
        "seconds_per_query_mean": round(sum(seconds) / max(1, len(seconds)), 2),
        "model_calls": {
            key: sum(done[qid]["calls"][key] for qid in ids)
            for key in ("count", "prompt_tokens", "output_tokens")
        },
    }
    (output / "metrics.json").write_text(json.dumps(result, indent=2) + "\n")
    (output / "per_query.json").write_text(json.dumps(per_query, indent=1) + "\n")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m streamrank.eval.bench.published_rerankers")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("eval", help="evaluate a pipeline one query at a time, resumable")
    p.add_argument("--dataset", "-d", required=True)
    p.add_argument("--pipeline", "-p", required=True)
    p.add_argument("--output", "-o", required=True)
    p.add_argument("--limit", type=int)
    p = sub.add_parser("parity", help="the benchmark with fewer prompts or methods (a bigger model on a CPU)")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--queries", type=int, default=QUERIES)
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated: svd, whitened")
    p.add_argument("--output", "-o")
    args = parser.parse_args(argv)
    if args.command == "parity":
        from streamrank.eval.bench import run_benchmark

        output = Path(args.output) if args.output else None
        options = {"model": args.model, "queries": args.queries, "methods": tuple(args.methods.split(","))}
        run_benchmark("published-rerankers", output_dir=output, **options)
        return 0
    result = resumable_eval(args.dataset, args.pipeline, Path(args.output), args.limit)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
