"""GPU benchmark of the fused low-rank kernels: ``python -m streamrank.eval.bench.kernels_gpu --output DIR``.

Same blocks and table as ``streamrank.kernels.bench`` (MiniLM- and SmolLM2-size attention + FFN at
sequence 128/512/2048, batch 8 and 32), on CUDA with the Triton backend next to dense, unfused
low-rank (materialised scores and SDPA) and the streaming torch path. Peak memory is
``torch.cuda.max_memory_allocated`` above the level before each forward. Writes ``kernels_gpu.json``.
Imports cleanly without a GPU; running it needs CUDA. About 1-2 minutes on an H100 (first Triton
compilations included).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from streamrank.kernels.bench import memory_target, run_block_benchmark, write_report

VARIANTS_GPU = ("dense", "unfused", "unfused_sdpa", "torch", "triton")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def run_gpu_benchmark(output: Path | None, quick: bool = False, dtype: str = "float32") -> dict:
    """Run the block benchmark on CUDA; write ``kernels_gpu.json`` into ``output`` when given."""
    if not torch.cuda.is_available():
        raise SystemExit("kernels_gpu needs a CUDA device")
    sizes = {"seqs": (64,), "batches": (2,)} if quick else {"seqs": (128, 512, 2048), "batches": (8, 32)}
    # warm-up: compile every Triton kernel variant once before anything is timed
    run_block_benchmark("cuda", ("triton",), seqs=(64,), batches=(2,), reps=1, dtype=DTYPES[dtype])
    rows = run_block_benchmark(
        "cuda", VARIANTS_GPU, max_tokens=65536, reps=10, reps_large=5, dtype=DTYPES[dtype], **sizes
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
    args = parser.parse_args(argv)
    run_gpu_benchmark(args.output, args.quick, args.dtype)


if __name__ == "__main__":
    main()
