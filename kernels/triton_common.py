"""What the Triton kernels share: device checks, tile sizes, launch with fallback, jit building blocks.

Used by :mod:`streamrank.kernels.triton_kernels` (linear, FFN, encoder attention) and
:mod:`streamrank.kernels.triton_decoder` (decoder attention over a rank-space KV cache). All tiles are
cast to float32 inside the kernels (the Triton CPU interpreter returns garbage for bf16 ``tl.dot``).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources


def interpreter_enabled() -> bool:
    """True when Triton runs kernels through its CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _check_device(x: torch.Tensor) -> None:
    if not x.is_cuda and not interpreter_enabled():
        raise RuntimeError(
            "Triton kernels need a CUDA tensor (or TRITON_INTERPRET=1 set before importing triton)"
        )


def _pad(n: int) -> int:
    """Tile width covering ``n``: the next power of two, at least 16 (``tl.dot`` minimum)."""
    return max(16, triton.next_power_of_2(n))


def _precision(*tensors: torch.Tensor | None) -> str:
    return "ieee" if all(t is None or t.dtype == torch.float32 for t in tensors) else "tf32"


# ---------------------------------------------------------------------------------------------
# Building blocks shared by the kernels
# ---------------------------------------------------------------------------------------------


@triton.jit
def _project_rows(
    x_ptr, stride_xm, stride_xk, v_ptr, stride_vr, stride_vk,
    offs_m, mask_m, K, R,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, R_PAD: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """Rank-space tile ``x[offs_m] @ V^T`` -> ``[BLOCK_M, R_PAD]`` (float32, zero past ``R``)."""
    offs_r = tl.arange(0, R_PAD)
    acc = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(
            x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
            mask=mask_m[:, None] & (offs_k[None, :] < K),
            other=0.0,
        ).to(tl.float32)
        vt = tl.load(
            v_ptr + offs_r[None, :] * stride_vr + offs_k[:, None] * stride_vk,
            mask=(offs_r[None, :] < R) & (offs_k[:, None] < K),
            other=0.0,
        ).to(tl.float32)
        acc += tl.dot(x, vt, input_precision=PREC)
    return acc


@triton.jit
def _load_rows(
    p_ptr, stride_pm, stride_pr, offs_m, mask_m, R,
    R_PAD: tl.constexpr,
):  # fmt: skip
    """Load a precomputed rank-space tile ``P[offs_m, :R]`` -> ``[BLOCK_M, R_PAD]`` float32."""
    offs_r = tl.arange(0, R_PAD)
    return tl.load(
        p_ptr + offs_m[:, None] * stride_pm + offs_r[None, :] * stride_pr,
        mask=mask_m[:, None] & (offs_r[None, :] < R),
        other=0.0,
    ).to(tl.float32)


@triton.jit
def _rebuild_cols(
    p, u_ptr, stride_un, stride_ur, b_ptr, offs_n, N, R,
    R_PAD: tl.constexpr, HAS_BIAS: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """Output columns ``offs_n`` of ``p @ U^T + b`` -> ``[BLOCK_M, BLOCK_N]`` float32 (zero past ``N``)."""
    offs_r = tl.arange(0, R_PAD)
    ut = tl.load(
        u_ptr + offs_n[None, :] * stride_un + offs_r[:, None] * stride_ur,
        mask=(offs_n[None, :] < N) & (offs_r[:, None] < R),
        other=0.0,
    ).to(tl.float32)
    y = tl.dot(p, ut, input_precision=PREC)
    if HAS_BIAS:
        y += tl.load(b_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    return y


SMALLER_TILES = ({"num_stages": 2}, {"num_stages": 1}, {"num_stages": 1, "BLOCK_F": 16, "BLOCK_N": 32})
"""Settings tried in turn when a launch needs more shared memory than the GPU has (large ranks
keep ``[block, rank]`` fp32 tiles on chip; software pipelining multiplies them by ``num_stages``)."""

_fitting_tiles: dict[tuple, dict] = {}


def _launch(kernel, grid: tuple[int, ...], *args, **meta) -> None:
    """Launch ``kernel``; on ``OutOfResources`` retry with :data:`SMALLER_TILES`, remembering what fits."""
    key = (kernel.fn.__name__, *sorted(meta.items()))
    candidates = [_fitting_tiles[key]] if key in _fitting_tiles else [{}]
    candidates += [{k: v for k, v in t.items() if k in meta or k == "num_stages"} for t in SMALLER_TILES]
    for i, override in enumerate(candidates):
        try:
            kernel[grid](*args, **{**meta, **override})
        except OutOfResources:
            if i == len(candidates) - 1:
                raise
            continue
        _fitting_tiles[key] = override
        return


def _bias_arg(bias: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return bias if bias is not None else like  # any pointer; never read when HAS_BIAS is False
