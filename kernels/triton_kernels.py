"""Triton kernels for low-rank layers (FlashSVD-style), each matching a function of ``reference``.

1. :func:`lowrank_linear`: ``y = (x V^T) U^T + b``; the rank-r intermediate of a row block stays in
   registers while the kernel walks the output columns.
2. :func:`lowrank_ffn`: up (and gate) projections rebuilt from their factors one ``d_ff`` block at
   a time, activation applied, the block pushed into the rank space of the down projection
   (accumulated on chip), then lifted to the output. No ``[tokens, d_ff]`` tensor exists.
3. :func:`lowrank_attention`: per (query block, head), Q is rebuilt from its factors, then K/V tiles
   are rebuilt block by block and folded in with a FlashAttention online softmax (key padding mask,
   causal mask, grouped-query heads). Neither Q/K/V nor the score matrix is written to memory. By
   default the kernel reads the rank-space activations ``x V^T`` (``[tokens, r]``, computed by one
   small GEMM, as FlashSVD does); ``project_in_kernel=True`` rebuilds them from ``x`` per tile too,
   which needs no extra memory at the price of recomputing the projection per head and query block.

All tiles are cast to float32 inside the kernels (the Triton CPU interpreter returns garbage for
bf16 ``tl.dot``); products use IEEE fp32 for fp32 inputs and TF32 (exact for fp16/bf16 inputs) for
half-precision ones. On CPU these run only with ``TRITON_INTERPRET=1`` set before Triton is imported.
Block sizes must be powers of two, at least 16; 32 or more is much faster in the interpreter.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .reference import Factors, project
from .triton_common import (
    _bias_arg,
    _check_device,
    _launch,
    _load_rows,
    _pad,
    _precision,
    _project_rows,
    _rebuild_cols,
    interpreter_enabled,  # noqa: F401 (public: tests and benchmarks ask it here)
)

ACTIVATION_IDS = {"gelu": 0, "gelu_tanh": 1, "silu": 2, "relu": 3}


@triton.jit
def _activate(h, ACT: tl.constexpr):
    """Elementwise activation; ids as in ``ACTIVATION_IDS``. All map 0 to 0 (padding stays zero)."""
    if ACT == 0:
        h = 0.5 * h * (1.0 + tl.erf(h * 0.7071067811865476))
    elif ACT == 1:
        inner = 0.7978845608028654 * (h + 0.044715 * h * h * h)
        h = h * tl.sigmoid(2.0 * inner)  # 0.5 * (1 + tanh(t)) == sigmoid(2t)
    elif ACT == 2:
        h = h * tl.sigmoid(h)
    else:
        h = tl.maximum(h, 0.0)
    return h


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------


@triton.jit
def _lowrank_linear_kernel(
    x_ptr, v_ptr, u_ptr, b_ptr, y_ptr,
    M, K, N, R,
    stride_xm, stride_xk, stride_vr, stride_vk, stride_un, stride_ur, stride_ym, stride_yn,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    R_PAD: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    p = _project_rows(
        x_ptr, stride_xm, stride_xk, v_ptr, stride_vr, stride_vk, offs_m, mask_m, K, R,
        BLOCK_M, BLOCK_K, R_PAD, PREC,
    )  # fmt: skip
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        y = _rebuild_cols(p, u_ptr, stride_un, stride_ur, b_ptr, offs_n, N, R, R_PAD, HAS_BIAS, PREC)
        tl.store(
            y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn,
            y.to(y_ptr.dtype.element_ty),
            mask=mask_m[:, None] & (offs_n[None, :] < N),
        )


@triton.jit
def _lowrank_ffn_kernel(
    x_ptr, vu_ptr, uu_ptr, bu_ptr, vg_ptr, ug_ptr, bg_ptr, vd_ptr, ud_ptr, bd_ptr, y_ptr,
    M, K, F, N, RU, RG, RD,
    stride_xm, stride_xk,
    stride_vu_r, stride_vu_k, stride_uu_f, stride_uu_r,
    stride_vg_r, stride_vg_k, stride_ug_f, stride_ug_r,
    stride_vd_r, stride_vd_f, stride_ud_n, stride_ud_r,
    stride_ym, stride_yn,
    GATED: tl.constexpr, ACT: tl.constexpr,
    HAS_BU: tl.constexpr, HAS_BG: tl.constexpr, HAS_BD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    RU_PAD: tl.constexpr, RG_PAD: tl.constexpr, RD_PAD: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    p_up = _project_rows(
        x_ptr, stride_xm, stride_xk, vu_ptr, stride_vu_r, stride_vu_k, offs_m, mask_m, K, RU,
        BLOCK_M, BLOCK_K, RU_PAD, PREC,
    )  # fmt: skip
    if GATED:
        p_gate = _project_rows(
            x_ptr, stride_xm, stride_xk, vg_ptr, stride_vg_r, stride_vg_k, offs_m, mask_m, K, RG,
            BLOCK_M, BLOCK_K, RG_PAD, PREC,
        )  # fmt: skip
    z = tl.zeros((BLOCK_M, RD_PAD), dtype=tl.float32)  # rank space of the down projection
    offs_rd = tl.arange(0, RD_PAD)
    for f0 in range(0, F, BLOCK_F):
        offs_f = f0 + tl.arange(0, BLOCK_F)
        h = _rebuild_cols(p_up, uu_ptr, stride_uu_f, stride_uu_r, bu_ptr, offs_f, F, RU, RU_PAD, HAS_BU, PREC)
        if GATED:
            g = _rebuild_cols(
                p_gate, ug_ptr, stride_ug_f, stride_ug_r, bg_ptr, offs_f, F, RG, RG_PAD, HAS_BG, PREC
            )
            h = _activate(g, ACT) * h
        else:
            h = _activate(h, ACT)
        vdt = tl.load(
            vd_ptr + offs_rd[None, :] * stride_vd_r + offs_f[:, None] * stride_vd_f,
            mask=(offs_rd[None, :] < RD) & (offs_f[:, None] < F),
            other=0.0,
        ).to(tl.float32)
        z += tl.dot(h, vdt, input_precision=PREC)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        y = _rebuild_cols(z, ud_ptr, stride_ud_n, stride_ud_r, bd_ptr, offs_n, N, RD, RD_PAD, HAS_BD, PREC)
        tl.store(
            y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn,
            y.to(y_ptr.dtype.element_ty),
            mask=mask_m[:, None] & (offs_n[None, :] < N),
        )


@triton.jit
def _rank_tile(
    src_ptr, stride_sb, stride_sm, stride_sk, v_ptr, stride_vr, stride_vk,
    b, offs, mask, K, R,
    PROJECT: tl.constexpr, BLOCK: tl.constexpr, BLOCK_K: tl.constexpr, R_PAD: tl.constexpr,
    PREC: tl.constexpr,
):  # fmt: skip
    """Rank-space tile of batch ``b`` rows ``offs``: projected from ``x`` or loaded from ``P``."""
    if PROJECT:
        p = _project_rows(
            src_ptr + b * stride_sb, stride_sm, stride_sk, v_ptr, stride_vr, stride_vk, offs, mask, K, R,
            BLOCK, BLOCK_K, R_PAD, PREC,
        )  # fmt: skip
    else:
        p = _load_rows(src_ptr + b * stride_sb, stride_sm, stride_sk, offs, mask, R, R_PAD)
    return p


@triton.jit
def _lowrank_attention_kernel(
    q_src, k_src, v_src,
    vq_ptr, vk_ptr, vv_ptr, uq_ptr, uk_ptr, uv_ptr, bq_ptr, bk_ptr, bv_ptr,
    mask_ptr, o_ptr,
    S, K, RQ, RK, RV, NUM_HEADS, GROUPS, D, scale,
    stride_qb, stride_qm, stride_qk, stride_kb, stride_km, stride_kk, stride_vb, stride_vm, stride_vk,
    stride_vq_r, stride_vq_k, stride_vk_r, stride_vk_k, stride_vv_r, stride_vv_k,
    stride_uq_n, stride_uq_r, stride_uk_n, stride_uk_r, stride_uv_n, stride_uv_r,
    stride_mb, stride_mn, stride_ob, stride_om, stride_on,
    PROJECT: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
    HAS_BQ: tl.constexpr, HAS_BK: tl.constexpr, HAS_BV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    RQ_PAD: tl.constexpr, RK_PAD: tl.constexpr, RV_PAD: tl.constexpr, D_PAD: tl.constexpr,
    PREC: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    b = tl.program_id(1) // NUM_HEADS
    h = tl.program_id(1) % NUM_HEADS
    kvh = h // GROUPS
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < S
    offs_d = tl.arange(0, D_PAD)

    pq = _rank_tile(
        q_src, stride_qb, stride_qm, stride_qk, vq_ptr, stride_vq_r, stride_vq_k, b, offs_m, mask_m, K, RQ,
        PROJECT, BLOCK_M, BLOCK_K, RQ_PAD, PREC,
    )  # fmt: skip
    q = _rebuild_cols(
        pq, uq_ptr + h * D * stride_uq_n, stride_uq_n, stride_uq_r, bq_ptr + h * D, offs_d, D, RQ,
        RQ_PAD, HAS_BQ, PREC,
    )  # fmt: skip
    q = q * scale

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, D_PAD), dtype=tl.float32)
    hi = S
    if CAUSAL:
        hi = tl.minimum(S, (pid_m + 1) * BLOCK_M)
    for n0 in range(0, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        in_range = offs_n < S
        pk = _rank_tile(
            k_src, stride_kb, stride_km, stride_kk, vk_ptr, stride_vk_r, stride_vk_k, b, offs_n, in_range,
            K, RK, PROJECT, BLOCK_N, BLOCK_K, RK_PAD, PREC,
        )  # fmt: skip
        k = _rebuild_cols(
            pk, uk_ptr + kvh * D * stride_uk_n, stride_uk_n, stride_uk_r, bk_ptr + kvh * D, offs_d, D, RK,
            RK_PAD, HAS_BK, PREC,
        )  # fmt: skip
        s = tl.dot(q, tl.trans(k), input_precision=PREC)
        visible = tl.full((BLOCK_M, BLOCK_N), 1, dtype=tl.int1)
        if HAS_MASK:
            keep = tl.load(mask_ptr + b * stride_mb + offs_n * stride_mn, mask=in_range, other=0)
            visible = visible & (keep != 0)[None, :]
        if CAUSAL:
            visible = visible & (offs_n[None, :] <= offs_m[:, None])
        s = tl.where(visible, s, -1.0e30)  # reference.MASK_VALUE
        s = tl.where(in_range[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)

        pv = _rank_tile(
            v_src, stride_vb, stride_vm, stride_vk, vv_ptr, stride_vv_r, stride_vv_k, b, offs_n, in_range,
            K, RV, PROJECT, BLOCK_N, BLOCK_K, RV_PAD, PREC,
        )  # fmt: skip
        v = _rebuild_cols(
            pv, uv_ptr + kvh * D * stride_uv_n, stride_uv_n, stride_uv_r, bv_ptr + kvh * D, offs_d, D, RV,
            RV_PAD, HAS_BV, PREC,
        )  # fmt: skip
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=PREC)
        m_i = m_new

    out = acc / l_i[:, None]
    tl.store(
        o_ptr + b * stride_ob + offs_m[:, None] * stride_om + (h * D + offs_d)[None, :] * stride_on,
        out.to(o_ptr.dtype.element_ty),
        mask=mask_m[:, None] & (offs_d[None, :] < D),
    )


# ---------------------------------------------------------------------------------------------
# Python wrappers
# ---------------------------------------------------------------------------------------------


def lowrank_linear(
    x: torch.Tensor, f: Factors, *, block_m: int = 32, block_n: int = 64, block_k: int = 32
) -> torch.Tensor:
    """Fused ``y = (x V^T) U^T + b`` for ``x: [..., in]`` (rank-r intermediate kept on chip)."""
    _check_device(x)
    x2 = x.reshape(-1, x.shape[-1])
    m, k = x2.shape
    n, r = f.U.shape
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(m, block_m),)
    _launch(
        _lowrank_linear_kernel, grid, x2, f.V, f.U, _bias_arg(f.bias, f.U), y,
        m, k, n, r,
        x2.stride(0), x2.stride(1), f.V.stride(0), f.V.stride(1), f.U.stride(0), f.U.stride(1),
        y.stride(0), y.stride(1),
        HAS_BIAS=f.bias is not None, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        R_PAD=_pad(r), PREC=_precision(x, f.U, f.V),
    )  # fmt: skip
    return y.view(*x.shape[:-1], n)


def lowrank_ffn(
    x: torch.Tensor,
    up: Factors,
    down: Factors,
    activation: str = "gelu",
    gate: Factors | None = None,
    *,
    block_m: int = 32,
    block_f: int = 64,
    block_n: int = 64,
    block_k: int = 32,
) -> torch.Tensor:
    """Fused low-rank FFN (``reference.lowrank_ffn``), streamed over ``d_ff`` in blocks of ``block_f``."""
    _check_device(x)
    x2 = x.reshape(-1, x.shape[-1])
    m, k = x2.shape
    d_ff, r_up = up.U.shape
    n, r_down = down.U.shape
    g = gate if gate is not None else up  # placeholder pointers when not gated
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(m, block_m),)
    _launch(
        _lowrank_ffn_kernel, grid, x2, up.V, up.U, _bias_arg(up.bias, up.U), g.V, g.U, _bias_arg(g.bias, g.U),
        down.V, down.U, _bias_arg(down.bias, down.U), y,
        m, k, d_ff, n, r_up, g.rank, r_down,
        x2.stride(0), x2.stride(1),
        up.V.stride(0), up.V.stride(1), up.U.stride(0), up.U.stride(1),
        g.V.stride(0), g.V.stride(1), g.U.stride(0), g.U.stride(1),
        down.V.stride(0), down.V.stride(1), down.U.stride(0), down.U.stride(1),
        y.stride(0), y.stride(1),
        GATED=gate is not None, ACT=ACTIVATION_IDS[activation],
        HAS_BU=up.bias is not None, HAS_BG=gate is not None and gate.bias is not None,
        HAS_BD=down.bias is not None,
        BLOCK_M=block_m, BLOCK_F=block_f, BLOCK_N=block_n, BLOCK_K=block_k,
        RU_PAD=_pad(r_up), RG_PAD=_pad(g.rank), RD_PAD=_pad(r_down),
        PREC=_precision(x, up.U, up.V, down.U, down.V, g.U, g.V),
    )  # fmt: skip
    return y.view(*x.shape[:-1], n)


def lowrank_attention(
    x: torch.Tensor,
    q: Factors,
    k: Factors,
    v: Factors,
    num_heads: int,
    num_kv_heads: int | None = None,
    key_mask: torch.Tensor | None = None,
    causal: bool = False,
    scale: float | None = None,
    *,
    project_in_kernel: bool = False,
    block_m: int = 32,
    block_n: int = 32,
    block_k: int = 32,
) -> torch.Tensor:
    """Fused low-rank self-attention (``reference.lowrank_attention``) for ``x: [B, S, hidden]``.

    With ``project_in_kernel=False`` the rank-space activations ``x V^T`` are computed first
    (``[B, S, r]`` each, one GEMM); Q/K/V tiles are rebuilt from them inside the kernel.
    """
    _check_device(x)
    num_kv_heads = num_kv_heads or num_heads
    batch, seq, hidden = x.shape
    head_dim = q.U.shape[0] // num_heads
    scale = scale if scale is not None else 1.0 / math.sqrt(head_dim)
    if project_in_kernel:
        srcs = (x, x, x)
    else:
        srcs = tuple(project(x, f.V) for f in (q, k, v))
    out = torch.empty(batch, seq, q.U.shape[0], dtype=x.dtype, device=x.device)
    mask = key_mask.to(torch.int8) if key_mask is not None else out  # placeholder when absent
    grid = (triton.cdiv(seq, block_m), batch * num_heads)
    _launch(
        _lowrank_attention_kernel, grid, *srcs, q.V, k.V, v.V, q.U, k.U, v.U,
        _bias_arg(q.bias, q.U), _bias_arg(k.bias, k.U), _bias_arg(v.bias, v.U),
        mask, out,
        seq, hidden, q.rank, k.rank, v.rank, num_heads, num_heads // num_kv_heads, head_dim, scale,
        *srcs[0].stride(), *srcs[1].stride(), *srcs[2].stride(),
        q.V.stride(0), q.V.stride(1), k.V.stride(0), k.V.stride(1), v.V.stride(0), v.V.stride(1),
        q.U.stride(0), q.U.stride(1), k.U.stride(0), k.U.stride(1), v.U.stride(0), v.U.stride(1),
        mask.stride(0), mask.stride(1) if key_mask is not None else 0,
        out.stride(0), out.stride(1), out.stride(2),
        PROJECT=project_in_kernel, CAUSAL=causal, HAS_MASK=key_mask is not None,
        HAS_BQ=q.bias is not None, HAS_BK=k.bias is not None, HAS_BV=v.bias is not None,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        RQ_PAD=_pad(q.rank), RK_PAD=_pad(k.rank), RV_PAD=_pad(v.rank), D_PAD=_pad(head_dim),
        PREC=_precision(x, q.U, k.U, v.U, q.V, k.V, v.V),
    )  # fmt: skip
    return out
