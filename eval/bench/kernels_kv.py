"""KV-cache bytes of the LLM rerankers, dense vs rank-space, on the packaged SmolLM2-135M.

``python -m streamrank.eval.bench.kernels_kv [--output DIR] [--quick]``

For each compression ratio, the same compressed model is run twice over the same prompts: on the
unfused path (the model's own attention, full-width K/V in a transformers DynamicCache) and on the
fused path (:mod:`streamrank.kernels.decoder`: a rank-space cache of ``x V_k^T``, ``x V_v^T`` and the
positions). Measured: the bytes of the query's prefix cache (instruction + query, as FIRST and the
groupwise ranker build it) and the peak while one group of candidates streams through it (prefix +
group, batch 1, as the groupwise ranker does), with the identifier logits of both paths compared.
The DL19 query and passages are those of ``streamrank bench rerank`` (d).
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path
from typing import Any

RATIOS = (0.5, 0.8)
GROUP_SIZE = 10
PASSAGE_TOKENS = (8, 48)


def _measure(llm: Any, query: str, passages: list[str], passage_tokens: int) -> dict[str, Any]:
    from streamrank.rankers.causal_lm_loading import LLMSettings
    from streamrank.rankers.kv import PrefixCache, kv_bytes
    from streamrank.rankers.prompts import PromptBuilder

    builder = PromptBuilder(llm, LLMSettings(max_passage_tokens=passage_tokens))
    prefix = PrefixCache(llm, builder.listwise_prefix(query))
    prompt = builder.listwise(query, passages)
    started = time.perf_counter()
    logits, _ = llm.next_token_logits([list(prompt.body)], prompt.label_ids, prefix=prefix)
    return {
        "prefix_tokens": prefix.length,
        "group_tokens": len(prompt.body),
        "prefix_bytes": kv_bytes(prefix.cache),
        "group_peak_bytes": prefix.peak_bytes,
        "cache": type(prefix.cache).__name__,
        "group_seconds": round(time.perf_counter() - started, 3),
        "logits": logits[0],
    }


def run_kv_benchmark(output_dir: Path | None = None, quick: bool = False) -> dict[str, Any]:
    """Prefix and streamed-group KV bytes, dense vs rank-space, at each ratio of :data:`RATIOS`."""
    import torch

    from streamrank.eval.bench.rerank import dl19_pool
    from streamrank.kernels.lowrank import apply_lowrank, set_backend
    from streamrank.rankers.causal_lm import CausalLM
    from streamrank.rankers.causal_lm_loading import LLMSettings, load_causal_lm

    torch.set_num_threads(1)
    dense = load_causal_lm(LLMSettings(), "cpu")
    query, pool = dl19_pool(GROUP_SIZE)
    passages = [c.document.text for c in pool if c.document is not None][:GROUP_SIZE]
    rows = []
    for ratio in RATIOS[:1] if quick else RATIOS:
        model = apply_lowrank(copy.deepcopy(dense.model), ratio=ratio, backend="torch")
        llm = CausalLM(model, dense.tokenizer, dense.name)
        attn = model.model.layers[0].self_attn
        for tokens in PASSAGE_TOKENS[:1] if quick else PASSAGE_TOKENS:
            rank = _measure(llm, query.text, passages, tokens)
            set_backend(model, "unfused")
            full = _measure(llm, query.text, passages, tokens)
            set_backend(model, "torch")
            rows.append(
                {
                    "ratio": ratio,
                    "rank_k": attn.k_proj.rank,
                    "rank_v": attn.v_proj.rank,
                    "kv_width": attn.k_proj.out_features,
                    "passage_tokens": tokens,
                    "prefix_tokens": rank["prefix_tokens"],
                    "group_tokens": rank["group_tokens"],
                    "dense_prefix_bytes": full["prefix_bytes"],
                    "rank_prefix_bytes": rank["prefix_bytes"],
                    "dense_group_peak_bytes": full["group_peak_bytes"],
                    "rank_group_peak_bytes": rank["group_peak_bytes"],
                    "prefix_ratio": round(rank["prefix_bytes"] / full["prefix_bytes"], 4),
                    "group_ratio": round(rank["group_peak_bytes"] / full["group_peak_bytes"], 4),
                    "r_over_d": round(
                        (attn.k_proj.rank + attn.v_proj.rank) / (2 * attn.k_proj.out_features), 4
                    ),
                    "max_abs_logit_diff": float((rank["logits"] - full["logits"]).abs().max()),
                    "caches": [full["cache"], rank["cache"]],
                    "group_seconds_unfused_fused": [full["group_seconds"], rank["group_seconds"]],
                }
            )
            print(json.dumps(rows[-1]), flush=True)
        del model, llm
    result = {"model": dense.name, "query": query.text, "group_size": GROUP_SIZE, "rows": rows}
    if output_dir is not None:
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        (Path(output_dir) / "kernels_kv.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def format_table(result: dict[str, Any]) -> str:
    """The markdown table of BENCHMARKS.md."""
    lines = [
        "| ratio | r_k + r_v / 2 d | passage tokens | prefix tokens | prefix KiB dense / rank-space (ratio) "
        "| prefix + one group KiB dense / rank-space (ratio) | max logit diff |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['ratio']} | {r['rank_k'] + r['rank_v']} / {2 * r['kv_width']} ({r['r_over_d']}) "
            f"| {r['passage_tokens']} | {r['prefix_tokens']} "
            f"| {r['dense_prefix_bytes'] / 1024:.1f} / {r['rank_prefix_bytes'] / 1024:.1f} ({r['prefix_ratio']}) "
            f"| {r['dense_group_peak_bytes'] / 1024:.1f} / {r['rank_group_peak_bytes'] / 1024:.1f} "
            f"({r['group_ratio']}) | {r['max_abs_logit_diff']:.1e} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    print(format_table(run_kv_benchmark(args.output, args.quick)))


if __name__ == "__main__":
    main()
