"""GPU benchmark of the fused low-rank kernels: ``python -m streamrank.eval.bench.kernels_gpu --output DIR``.

Same blocks and table as ``streamrank.eval.bench.kernels`` (MiniLM- and SmolLM2-size attention + FFN at
sequence 128/512/2048, batch 8 and 32), on CUDA with the Triton backend next to dense, unfused
low-rank (materialised scores and SDPA) and the streaming torch path. Peak memory is
``torch.cuda.max_memory_allocated`` above the level before each forward. Writes ``kernels_gpu.json``.
Imports cleanly without a GPU; running it needs CUDA. fp16 / bf16: under a minute on an H200 (first
Triton compilations included); fp32 takes several minutes (IEEE fp32 products use no tensor cores).

``--check`` first compares the compiled Triton kernels with the fp32 torch reference on CUDA (both
block shapes, ragged sequence lengths with padding masks, fp32 / fp16 / bf16) and writes
``kernels_gpu_check.json``; it exits non-zero when a difference is over its tolerance.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from streamrank.eval.bench.kernels import (
    SHAPES,
    _key_mask,
    block_forward,
    make_block,
    memory_target,
    run_block_benchmark,
    write_report,
)

VARIANTS_GPU = ("dense", "unfused", "unfused_sdpa", "torch", "triton")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


CHECK_SEQS = (77, 512)
CHECK_TOLERANCE = {"float32": 1e-3, "float16": 2e-2, "bfloat16": 6e-2}
"""Largest |triton - reference| allowed, relative to the reference output's largest magnitude."""


def check_against_reference(device: str = "cuda", seqs: tuple[int, ...] = CHECK_SEQS) -> list[dict]:
    """One block forward through the Triton kernels vs the fp32 unfused reference, per shape/dtype/seq."""
    rows = []
    for shape in SHAPES:
        reference_block = make_block(shape, device=device, dtype=torch.float32)
        for dtype_name, dtype in DTYPES.items():
            block = make_block(shape, device=device, dtype=dtype)
            for seq in seqs:
                gen = torch.Generator().manual_seed(seq)
                x = torch.randn(2, seq, shape.hidden, generator=gen).to(device)
                mask = _key_mask(2, seq, device)
                with torch.no_grad():
                    want = block_forward(reference_block, x, mask, "unfused")
                    got = block_forward(block, x.to(dtype), mask, "triton").float()
                error = ((got - want).abs().max() / want.abs().max()).item()
                rows.append({
                    "shape": shape.name, "dtype": dtype_name, "seq": seq, "relative_max_error": error,
                    "tolerance": CHECK_TOLERANCE[dtype_name], "ok": error <= CHECK_TOLERANCE[dtype_name],
                })  # fmt: skip
                print(f"check {shape.name:8s} {dtype_name:9s} seq {seq:4d}: {error:.2e}", flush=True)
    return rows


def run_gpu_benchmark(output: Path | None, quick: bool = False, dtype: str = "float32") -> dict:
    """Run the block benchmark on CUDA; write ``kernels_gpu.json`` into ``output`` when given."""
    if not torch.cuda.is_available():
        raise SystemExit("kernels_gpu needs a CUDA device")
    sizes = {"seqs": (64,), "batches": (2,)} if quick else {"seqs": (128, 512, 2048), "batches": (8, 32)}
    # warm-up: compile every Triton kernel variant once before anything is timed
    run_block_benchmark("cuda", ("triton",), seqs=(64,), batches=(2,), reps=1, dtype=DTYPES[dtype])
    rows = run_block_benchmark(
        "cuda",
        VARIANTS_GPU,
        max_tokens=65536,
        reps=10,
        reps_large=5,
        dtype=DTYPES[dtype],
        on_row=lambda row: print(json.dumps(row), flush=True),
        **sizes,
    )
    meta = {
        "device": torch.cuda.get_device_name(),
        "dtype": dtype,
        "ratio": 0.5,
        "quick": quick,
        "memory_method": "torch.cuda.max_memory_allocated above the level before one forward",
        "memory_target": {v: memory_target(rows, v) for v in ("torch", "triton")},
    }
    return write_report(rows, meta, output, "kernels_gpu.json")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=None, help="folder for kernels_gpu.json")
    parser.add_argument("--quick", action="store_true", help="tiny smoke run")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--check", action="store_true", help="compare with the torch reference first")
    args = parser.parse_args(argv)
    if args.check:
        if not torch.cuda.is_available():
            raise SystemExit("kernels_gpu needs a CUDA device")
        rows = check_against_reference()
        if args.output is not None:
            args.output.mkdir(parents=True, exist_ok=True)
            report = {"device": torch.cuda.get_device_name(), "rows": rows}
            (args.output / "kernels_gpu_check.json").write_text(json.dumps(report, indent=1) + "\n")
        if not all(row["ok"] for row in rows):
            raise SystemExit("Triton kernels differ from the reference beyond tolerance")
    run_gpu_benchmark(args.output, args.quick, args.dtype)


if __name__ == "__main__":
    main()
