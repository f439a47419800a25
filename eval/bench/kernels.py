"""Benchmark of one transformer block (attention + FFN) in dense, unfused low-rank and fused forms.

The block is: Q/K/V projections, multi-head attention (key padding mask for the MiniLM shape,
causal grouped-query attention for the SmolLM2 shape; no RoPE), output projection, residual,
FFN (GELU, or SiLU-gated), residual. Weights are random; the low-rank factors come from a truncated
SVD at ``ratio`` (same rank rule as the model compression). Variants:

- ``dense``: ``nn.Linear`` weights, attention with the score matrix materialised;
- ``unfused``: low-rank projections (two GEMMs each), attention with the score matrix materialised
  (``reference`` module, the FlashSVD baseline);
- ``unfused_sdpa``: low-rank projections, attention by ``torch.nn.functional.scaled_dot_product_attention``
  (what a Hugging Face model compressed with backend ``"unfused"`` runs by default);
- ``torch``: the streaming torch path; ``triton``: the fused Triton kernels (CUDA only here).

Peak activation memory is the peak of bytes held by torch's allocator during one forward, above
what was held before it (weights and input excluded, output included). On CPU it is read from the
allocation and free events that ``torch.profiler`` records with ``profile_memory=True`` (every c10
CPU allocation, including kernel workspaces, not only Python-visible tensors); on CUDA from
``torch.cuda.max_memory_allocated``. Latency is the best of ``reps`` runs after the profiled one.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from streamrank.kernels import ops, reference
from streamrank.kernels.reference import Factors
from streamrank.kernels.svd import rank_for_ratio, svd_factors

VARIANTS_CPU = ("dense", "unfused", "unfused_sdpa", "torch")
MEMORY_TARGET = 0.40  # streaming peak / unfused peak at sequence 512
TARGET_SEQ = 512
LARGE_WORK = 8 * 512 * 512  # batch * seq^2 above which fewer timed runs are made


@dataclass(frozen=True)
class BlockShape:
    """Sizes of one transformer block."""

    name: str
    hidden: int
    d_ff: int
    heads: int
    kv_heads: int
    activation: str
    gated: bool
    causal: bool


SHAPES = (
    BlockShape("minilm", 384, 1536, 12, 12, "gelu", gated=False, causal=False),
    BlockShape("smollm2", 576, 1536, 9, 3, "silu", gated=True, causal=True),
)


@dataclass
class Block:
    """Dense weights ``(W, b)`` and their low-rank factors, by projection name."""

    shape: BlockShape
    dense: dict[str, tuple[torch.Tensor, torch.Tensor | None]]
    lowrank: dict[str, Factors]


def make_block(
    shape: BlockShape, ratio: float = 0.5, device: str = "cpu", dtype: torch.dtype = torch.float32
) -> Block:
    """Random block weights and their SVD factors at ``ratio``."""
    gen = torch.Generator().manual_seed(0)
    kv = shape.hidden // shape.heads * shape.kv_heads
    sizes = {"q": (shape.hidden, shape.hidden), "k": (kv, shape.hidden), "v": (kv, shape.hidden),
             "o": (shape.hidden, shape.hidden), "up": (shape.d_ff, shape.hidden),
             "down": (shape.hidden, shape.d_ff)}  # fmt: skip
    if shape.gated:
        sizes["gate"] = (shape.d_ff, shape.hidden)
    bias = not shape.gated  # BERT projections have biases, Llama's do not
    dense, lowrank = {}, {}
    for name, (out_f, in_f) in sizes.items():
        w = torch.randn(out_f, in_f, generator=gen) / math.sqrt(in_f)
        b = torch.randn(out_f, generator=gen) * 0.02 if bias else None
        U, V = svd_factors(w, rank_for_ratio(out_f, in_f, ratio))
        w, b, U, V = (None if t is None else t.to(device=device, dtype=dtype) for t in (w, b, U, V))
        dense[name] = (w, b)
        lowrank[name] = Factors(U, V, b)
    return Block(shape, dense, lowrank)


def _sdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, s: BlockShape, key_mask: torch.Tensor | None
) -> torch.Tensor:
    pos = torch.arange(q.shape[1], device=q.device)
    allowed = reference.allowed_keys(key_mask, s.causal, pos, pos)
    out = F.scaled_dot_product_attention(
        reference.split_heads(q, s.heads),
        reference.split_heads(k, s.kv_heads),
        reference.split_heads(v, s.kv_heads),
        attn_mask=allowed,
        enable_gqa=s.kv_heads != s.heads,
    )
    return reference.merge_heads(out)


def block_forward(block: Block, x: torch.Tensor, key_mask: torch.Tensor | None, variant: str) -> torch.Tensor:
    """One block forward in ``variant`` (``dense``, ``unfused_sdpa`` or an ``ops`` backend name)."""
    s = block.shape
    if variant == "dense":
        d = block.dense
        q, k, v = (F.linear(x, *d[n]) for n in ("q", "k", "v"))
        ctx = reference.attention(q, k, v, s.heads, s.kv_heads, key_mask, s.causal)
        del q, k, v
        a = x + F.linear(ctx, *d["o"])
        del ctx
        g = F.linear(a, *d["gate"]) if s.gated else None
        h = reference.ffn_activation(F.linear(a, *d["up"]), g, s.activation)
        del g
        return a + F.linear(h, *d["down"])
    f = block.lowrank
    backend = "unfused" if variant == "unfused_sdpa" else variant
    if variant == "unfused_sdpa":
        ctx = _sdpa(*(reference.lowrank_linear(x, f[n]) for n in ("q", "k", "v")), s, key_mask)
    else:
        ctx = ops.lowrank_attention(
            x, f["q"], f["k"], f["v"], s.heads, s.kv_heads, key_mask, s.causal, backend=backend
        )
    a = x + ops.lowrank_linear(ctx, f["o"], backend)
    del ctx
    return a + ops.lowrank_ffn(a, f["up"], f["down"], s.activation, f.get("gate"), backend)


def peak_cpu_bytes(fn: Callable[[], Any]) -> int:
    """Peak bytes live in torch's CPU allocator while ``fn`` runs, above the level before it."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    live = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        if e.device_type() == DeviceType.CPU:
            live += e.nbytes()
            peak = max(peak, live)
    return peak


def peak_cuda_bytes(fn: Callable[[], Any]) -> int:
    """Peak bytes allocated on the current CUDA device while ``fn`` runs, above the level before it."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def best_latency_s(fn: Callable[[], Any], reps: int, device: str) -> float:
    """Fastest of ``reps`` timed runs."""
    best = math.inf
    for _ in range(reps):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best


def _key_mask(batch: int, seq: int, device: str) -> torch.Tensor:
    """Padding mask with lengths spread over ``[seq/2, seq]`` (the first row is full length)."""
    lengths = torch.linspace(seq, seq // 2, batch).round().long()
    return (torch.arange(seq)[None, :] < lengths[:, None]).to(device)


def _measure(
    block: Block, x: torch.Tensor, key_mask: torch.Tensor | None, variant: str, device: str, reps: int
) -> tuple[torch.Tensor, int, float]:
    """Output, peak activation bytes (one profiled run) and best latency of one variant."""
    result: list[torch.Tensor] = []

    def run() -> None:
        result[:] = [block_forward(block, x, key_mask, variant)]

    with torch.inference_mode():
        peak = (peak_cuda_bytes if device == "cuda" else peak_cpu_bytes)(run)
        result.clear()
        latency = best_latency_s(run, reps, device)
    return result[0], peak, latency


def run_block_benchmark(
    device: str = "cpu",
    variants: Sequence[str] = VARIANTS_CPU,
    seqs: Iterable[int] = (128, 512, 2048),
    batches: Iterable[int] = (8, 32),
    max_tokens: int = 16384,
    reps: int = 2,
    reps_large: int = 1,
    ratio: float = 0.5,
    dtype: torch.dtype = torch.float32,
    shapes: Sequence[BlockShape] = SHAPES,
    on_row: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Measure every (shape, seq, batch, variant) with ``batch * seq <= max_tokens``; one row each.

    Configurations with more attention work than batch 8 x sequence 512 get ``reps_large`` timed runs.
    ``on_row`` sees each row as soon as it is measured (progress on long runs).
    """
    rows = []
    for shape in shapes:
        block = make_block(shape, ratio, device, dtype)
        for seq in seqs:
            for batch in batches:
                if batch * seq > max_tokens:
                    continue
                x = torch.randn(batch, seq, shape.hidden, generator=torch.Generator().manual_seed(1))
                x = x.to(device=device, dtype=dtype)
                key_mask = None if shape.causal else _key_mask(batch, seq, device)
                baseline = None
                for variant in variants:
                    n = reps if batch * seq * seq <= LARGE_WORK else reps_large
                    out, peak, latency = _measure(block, x, key_mask, variant, device, n)
                    if variant == "unfused":
                        baseline = (out, peak)
                    err = None
                    if variant != "dense" and baseline is not None:
                        err = (out.float() - baseline[0].float()).abs().max().item()
                    rows.append({
                        "shape": shape.name, "seq": seq, "batch": batch, "variant": variant,
                        "latency_ms": round(latency * 1e3, 2), "peak_mib": round(peak / 2**20, 2),
                        "mem_vs_unfused": round(peak / baseline[1], 3) if baseline else None,
                        "max_abs_err_vs_unfused": err,
                    })  # fmt: skip
                    if on_row is not None:
                        on_row(rows[-1])
                    del out
                del x, baseline
    return rows


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """Readable fixed-width table of benchmark rows."""
    head = f"{'shape':8} {'seq':>5} {'batch':>5} {'variant':13} {'latency ms':>11} {'peak MiB':>9} {'mem/unfused':>11} {'max err':>9}"
    lines = [head, "-" * len(head)]
    for r in rows:
        ratio = "" if r["mem_vs_unfused"] is None else f"{r['mem_vs_unfused']:.3f}"
        err = "" if r["max_abs_err_vs_unfused"] is None else f"{r['max_abs_err_vs_unfused']:.1e}"
        lines.append(
            f"{r['shape']:8} {r['seq']:>5} {r['batch']:>5} {r['variant']:13} {r['latency_ms']:>11.2f} "
            f"{r['peak_mib']:>9.2f} {ratio:>11} {err:>9}"
        )
    return "\n".join(lines)


def memory_target(rows: Sequence[dict[str, Any]], variant: str, seq: int = TARGET_SEQ) -> dict[str, Any]:
    """Worst ``variant`` / unfused peak-memory ratio at ``seq``, against ``MEMORY_TARGET``."""
    ratios = [r["mem_vs_unfused"] for r in rows if r["variant"] == variant and r["seq"] == seq]
    worst = max(ratios) if ratios else None
    return {"variant": variant, "seq": seq, "target": MEMORY_TARGET, "worst_ratio": worst,
            "met": None if worst is None else worst <= MEMORY_TARGET}  # fmt: skip


def write_report(rows: list[dict[str, Any]], meta: dict[str, Any], output: Path | None, name: str) -> dict:
    """Assemble the result dict, print the table, and write ``name`` into ``output`` when given."""
    result = {**meta, "shapes": [asdict(s) for s in SHAPES], "rows": rows}
    print(format_table(rows))
    print(json.dumps({k: v for k, v in result.items() if k not in ("rows", "shapes")}, indent=1))
    if output is not None:
        output.mkdir(parents=True, exist_ok=True)
        (output / name).write_text(json.dumps(result, indent=1) + "\n")
    return result


def run_kernels_benchmark(
    output_dir: Path | None = None, quick: bool = False, threads: int | None = 1
) -> dict:
    """CPU benchmark: dense vs unfused low-rank vs streaming torch path; prints a table.

    Full run: MiniLM- and SmolLM2-size blocks at sequence 128/512/2048, batch 8 and 32 (batch 32
    only up to 16k tokens); about 4 minutes on an idle core. ``quick``: sequence 64, batch 2, one
    timed run. Runs with ``threads`` torch threads (default 1: steadier timings on a shared machine;
    the previous setting is restored). Writes ``kernels.json`` into ``output_dir`` when given.
    """
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        rows = run_block_benchmark(seqs=(64,), batches=(2,), reps=1) if quick else run_block_benchmark()
        meta = {
            "device": "cpu",
            "torch_threads": torch.get_num_threads(),
            "ratio": 0.5,
            "dtype": "float32",
            "quick": quick,
            "memory_method": "torch.profiler profile_memory: peak of live CPU allocator bytes during one forward",
            "memory_target": memory_target(rows, "torch"),
        }
    finally:
        torch.set_num_threads(previous)
    return write_report(rows, meta, Path(output_dir) if output_dir is not None else None, "kernels.json")
