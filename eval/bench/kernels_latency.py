"""FlashSVD's latency claim on a GPU: fused Triton vs unfused + SDPA over the same low-rank factors.

``python -m streamrank.eval.bench.kernels_latency --output DIR`` (one command; CUDA, fp16 by default)

The blocks of the kernels issue, as the rerankers now run them: MiniLM (encoder attention with a key
padding mask + GELU FFN) and SmolLM2 (decoder attention with RoPE and grouped-query heads over
rank-space K/V, as the rank-space KV cache holds them, + SiLU-gated FFN); attention + output
projection + residual + FFN + residual; weights SVD-compressed to 50% of their parameters. Sequence
512 and 2048, batch 8 and 32. Variants, all over the same factors:

- ``unfused``: two GEMMs per projection, the score matrix materialised (the memory baseline);
- ``unfused_sdpa``: two GEMMs per projection (cuBLAS), RoPE, ``scaled_dot_product_attention`` (flash);
- ``triton``: the fused kernels at their default tiles (for SmolLM2 the decoder kernel), with the three
  rank-space projections in one GEMM;
- ``triton_tuned``: the same kernels at the fastest tile sizes of a small grid, searched per shape
  (:data:`TILE_GRID`), the choice reported.

Per row: best-of-``reps`` latency, peak memory above the level before one forward
(``torch.cuda.max_memory_allocated``), latency vs ``unfused_sdpa`` (target <= 1.0) and peak vs
``unfused`` (target <= 0.15 at sequence 512), max |error| vs ``unfused``, and the kernels issue's
earlier H200 figures side by side (:data:`EARLIER_H200_MS`). Writes ``kernels_latency.json``.
``--device cpu`` runs a tiny smoke version through the Triton interpreter (``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from streamrank.eval.bench.kernels import (
    SHAPES,
    Block,
    BlockShape,
    _key_mask,
    best_latency_s,
    block_forward,
    make_block,
    peak_cpu_bytes,
    peak_cuda_bytes,
)
from streamrank.kernels import reference
from streamrank.kernels.reference import Factors, Rope

VARIANTS = ("unfused", "unfused_sdpa", "triton", "triton_tuned")
SEQS, BATCHES = (512, 2048), (8, 32)
ROPE_THETA = 100000.0  # SmolLM2's
TILE_GRID = {"block_m": (32, 64, 128), "block_n": (32, 64, 128)}
"""Attention tiles searched per shape (FFN and linear tiles: block_m 32/64, block_f/block_n 64/128)."""
FFN_GRID = {"block_m": (32, 64), "block_f": (64, 128), "block_n": (64, 128)}
EARLIER_H200_MS = {  # BENCHMARKS.md, kernels issue, fp16: (unfused+SDPA, Triton) ms
    ("minilm", 512, 8): (0.37, 0.72), ("minilm", 512, 32): (0.63, 2.34),
    ("minilm", 2048, 8): (0.92, 6.79), ("minilm", 2048, 32): (3.01, 26.28),
    ("smollm2", 512, 8): (0.47, 0.62), ("smollm2", 512, 32): (0.92, 1.90),
    ("smollm2", 2048, 8): (1.11, 3.71), ("smollm2", 2048, 32): (3.64, 13.64),
}  # fmt: skip


def rope_for(shape: BlockShape, device: str) -> Rope:
    head_dim = shape.hidden // shape.heads
    inv_freq = 1.0 / ROPE_THETA ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    return Rope(inv_freq.to(device))


def _stack(*fs: Factors) -> torch.Tensor:
    """``[V_q; V_k; V_v]``: the three rank-space projections as one GEMM."""
    return torch.cat([f.V for f in fs], dim=0).contiguous()


def decoder_forward(block: Block, x: torch.Tensor, variant: str, tiles: dict | None = None) -> torch.Tensor:
    """SmolLM2-shape block with RoPE: attention over rank-space Q/K/V, o-proj, residual, gated FFN."""
    s, f = block.shape, block.lowrank
    rope = rope_for(s, str(x.device))
    pos = torch.arange(x.shape[1], device=x.device).expand(x.shape[0], -1)
    if variant in ("unfused", "unfused_sdpa"):
        q, k, v = (reference.lowrank_linear(x, f[n]) for n in ("q", "k", "v"))
        qh = reference.apply_rope(reference.split_heads(q, s.heads), pos, rope).to(x.dtype)
        kh = reference.apply_rope(reference.split_heads(k, s.kv_heads), pos, rope).to(x.dtype)
        if variant == "unfused":  # the score matrix materialised, in the block's dtype
            merged = reference.merge_heads
            ctx = reference.attention(merged(qh), merged(kh), v, s.heads, s.kv_heads, None, causal=True)
        else:
            vh = reference.split_heads(v, s.kv_heads)
            gqa = s.kv_heads != s.heads
            ctx = reference.merge_heads(
                F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, enable_gqa=gqa)
            )
        del q, k, v, qh, kh
        a = x + reference.lowrank_linear(ctx, f["o"])
        return a + reference.lowrank_ffn(a, f["up"], f["down"], s.activation, f["gate"])
    from streamrank.kernels import triton_decoder, triton_kernels

    tiles = tiles or {}
    if not hasattr(block, "stacked_v"):
        block.stacked_v = _stack(f["q"], f["k"], f["v"])  # once per block, like the weights
    stacked = reference.project(x, block.stacked_v)
    pq, pk, pv = stacked.split([f["q"].rank, f["k"].rank, f["v"].rank], dim=-1)
    attn = {k: tiles[k] for k in ("block_m", "block_n") if k in tiles}
    ctx = triton_decoder.rank_space_attention(
        pq, pk, pv, f["q"], f["k"], f["v"], s.heads, s.kv_heads, None, True, None, pos, pos, rope, **attn
    )
    a = x + triton_kernels.lowrank_linear(ctx, f["o"])
    ffn = {k[4:]: v for k, v in tiles.items() if k.startswith("ffn_")}
    return a + triton_kernels.lowrank_ffn(a, f["up"], f["down"], s.activation, f["gate"], **ffn)


def encoder_forward(
    block: Block, x: torch.Tensor, key_mask: torch.Tensor, variant: str, tiles: dict | None = None
) -> torch.Tensor:
    """MiniLM-shape block: the kernels issue's forward, with tile sizes for the tuned variant."""
    if variant in ("unfused", "unfused_sdpa", "triton") and not tiles:
        return block_forward(block, x, key_mask, variant)
    from streamrank.kernels import triton_kernels

    s, f = block.shape, block.lowrank
    attn = {k: tiles[k] for k in ("block_m", "block_n") if k in tiles}
    ctx = triton_kernels.lowrank_attention(x, f["q"], f["k"], f["v"], s.heads, s.kv_heads, key_mask, **attn)
    a = x + triton_kernels.lowrank_linear(ctx, f["o"])
    ffn = {k[4:]: v for k, v in tiles.items() if k.startswith("ffn_")}
    return a + triton_kernels.lowrank_ffn(a, f["up"], f["down"], s.activation, None, **ffn)


def _forward_fn(block: Block, x: torch.Tensor, mask: torch.Tensor | None, variant: str, tiles: dict | None):
    if block.shape.causal:
        return lambda: decoder_forward(block, x, variant, tiles)
    return lambda: encoder_forward(block, x, mask, variant, tiles)


def tune_tiles(
    block: Block, x: torch.Tensor, mask: torch.Tensor | None, device: str, reps: int, small: bool = False
) -> dict:
    """The fastest attention tiles, then the fastest FFN tiles given them (a greedy two-stage search).

    ``small``: one option per grid (the interpreter smoke run)."""

    def timed(tiles: dict) -> float:
        try:
            return best_latency_s(_forward_fn(block, x, mask, "triton", tiles), reps, device)
        except Exception:  # a tile that does not compile or fit: skip it
            return float("inf")

    best: dict[str, Any] = {}
    for grid in (TILE_GRID, {f"ffn_{k}": v for k, v in FFN_GRID.items()}):
        grid = {k: v[:1] for k, v in grid.items()} if small else grid
        keys = list(grid)
        options = [dict(zip(keys, values, strict=True)) for values in itertools.product(*grid.values())]
        best = min((({**best, **o}, timed({**best, **o})) for o in options), key=lambda t: t[1])[0]
    return best


def measure(run: Callable[[], torch.Tensor], device: str, reps: int) -> tuple[torch.Tensor, int, float]:
    out: list[torch.Tensor] = []

    def once() -> None:
        out[:] = [run()]

    with torch.inference_mode():
        once()  # compile / warm up
        peak = (peak_cuda_bytes if device == "cuda" else peak_cpu_bytes)(once)
        latency = best_latency_s(once, reps, device)
    return out[0], peak, latency


def run_latency_table(
    device: str = "cuda", dtype: torch.dtype = torch.float16, seqs=SEQS, batches=BATCHES, reps: int = 10
) -> list[dict[str, Any]]:
    rows = []
    for shape in SHAPES:
        block = make_block(shape, 0.5, device, dtype)
        for seq, batch in itertools.product(seqs, batches):
            x = torch.randn(batch, seq, shape.hidden, generator=torch.Generator().manual_seed(1)).to(
                device, dtype
            )
            mask = None if shape.causal else _key_mask(batch, seq, device)
            with torch.inference_mode():
                tiles = tune_tiles(block, x, mask, device, max(1, reps // 3), small=device == "cpu")
            results = {}
            for variant in VARIANTS:
                run = _forward_fn(
                    block, x, mask, variant.replace("_tuned", ""), tiles if "tuned" in variant else None
                )
                results[variant] = measure(run, device, reps)
            base_out, base_peak, _ = results["unfused"]
            sdpa_ms = results["unfused_sdpa"][2] * 1e3
            earlier = EARLIER_H200_MS.get((shape.name, seq, batch))
            for variant, (out, peak, latency) in results.items():
                rows.append({
                    "shape": shape.name, "seq": seq, "batch": batch, "variant": variant,
                    "latency_ms": round(latency * 1e3, 3), "peak_mib": round(peak / 2**20, 2),
                    "vs_sdpa_latency": round(latency * 1e3 / sdpa_ms, 3),
                    "vs_unfused_peak": round(peak / base_peak, 3),
                    "max_abs_err_vs_unfused": float((out.float() - base_out.float()).abs().max()),
                    "tiles": tiles if variant == "triton_tuned" else None,
                    "earlier_h200_ms": None if earlier is None else earlier[int(variant.startswith("triton"))],
                })  # fmt: skip
                print(json.dumps(rows[-1]), flush=True)
            del x, results
    return rows


def targets(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Fused <= 1.0x unfused+SDPA latency everywhere; fused peak <= 15% of unfused at sequence 512."""
    out = {}
    for variant in ("triton", "triton_tuned"):
        mine = [r for r in rows if r["variant"] == variant]
        worst_latency = max((r["vs_sdpa_latency"] for r in mine), default=None)
        worst_peak = max((r["vs_unfused_peak"] for r in mine if r["seq"] == 512), default=None)
        out[variant] = {
            "worst_latency_vs_sdpa": worst_latency, "latency_met": worst_latency is not None and worst_latency <= 1.0,
            "worst_peak_vs_unfused_512": worst_peak, "memory_met": worst_peak is not None and worst_peak <= 0.15,
        }  # fmt: skip
    return out


def markdown(rows: list[dict[str, Any]]) -> str:
    """BENCHMARKS.md table: one line per (shape, seq, batch), ms / MiB per variant."""
    lines = ["| shape | seq | batch | " + " | ".join(VARIANTS) + " | earlier SDPA / Triton ms |",
             "|---|---|---|" + "---|" * (len(VARIANTS) + 1)]  # fmt: skip
    keys = sorted({(r["shape"], r["seq"], r["batch"]) for r in rows}, key=lambda k: (k[0], k[1], k[2]))
    for key in keys:
        cells = {r["variant"]: r for r in rows if (r["shape"], r["seq"], r["batch"]) == key}
        parts = [
            f"{cells[v]['latency_ms']} / {cells[v]['peak_mib']} ({cells[v]['vs_sdpa_latency']}x)"
            for v in VARIANTS
        ]
        earlier = EARLIER_H200_MS.get(key)
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | " + " | ".join(parts) + f" | {earlier or '-'} |")
    return "\n".join(lines)


def run_kernels_latency_benchmark(
    output_dir: Path | None = None, quick: bool = False, *, dtype: str = "float16", reps: int = 10
) -> dict[str, Any]:
    """The latency table on CUDA (``streamrank bench kernels-latency``); ``quick``: tiny shapes through the
    Triton interpreter on the CPU (``TRITON_INTERPRET=1``), a smoke run of the same code."""
    from streamrank.errors import StreamRankError

    device = "cpu" if quick else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise StreamRankError("kernels-latency needs a CUDA device (--quick: a tiny smoke run on the CPU)")
    if device == "cpu" and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        raise StreamRankError("kernels-latency --quick runs Triton on the CPU: set TRITON_INTERPRET=1")
    rows = run_latency_table(
        device, getattr(torch, dtype), seqs=(32,) if quick else SEQS, batches=(1,) if quick else BATCHES,
        reps=1 if quick else reps,
    )  # fmt: skip
    result = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu (Triton interpreter)",
              "dtype": dtype, "ratio": 0.5, "targets": targets(rows), "rows": rows}  # fmt: skip
    print(markdown(rows))
    print(json.dumps(result["targets"], indent=1))
    if output_dir is not None:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "kernels_latency.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path)
    parser.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), default="float16")
    parser.add_argument(
        "--device", choices=("cuda", "cpu"), default="cuda", help="cpu: tiny interpreter smoke run"
    )
    parser.add_argument("--reps", type=int, default=10)
    args = parser.parse_args(argv)
    try:
        run_kernels_latency_benchmark(args.output, args.device == "cpu", dtype=args.dtype, reps=args.reps)
    except Exception as exc:  # noqa: BLE001 - the CLI's own message, not a traceback
        raise SystemExit(str(exc)) from None


if __name__ == "__main__":
    main()
