"""Triton kernel for decoder attention over a rank-space KV cache (``reference.rank_space_attention``).

Per (query block, head): the Q tile is rebuilt from the rank-space queries ``pq = x V_q^T`` and
``U_q``, rotated to its positions (RoPE, ``rotate_half`` layout), then key/value tiles are rebuilt
from the cached rank-space ``pk = x V_k^T`` / ``pv = x V_v^T`` and ``U_k`` / ``U_v`` block by block,
keys rotated to their stored positions, and folded in with a FlashAttention online softmax (key
padding mask, bottom-right aligned causal mask for continuations after a cache, grouped-query heads).
Neither full K/V, nor Q, nor the score matrix is written to memory: the cache holds ``r`` numbers per
token and layer instead of ``2 * kv_heads * head_dim``.

RoPE on a rebuilt tile: each head's rows of ``U`` are split in halves, ``h1 = p U[:D/2]^T`` and
``h2 = p U[D/2:]^T``, so ``rotate_half`` needs no permutation: ``h1' = h1 cos - h2 sin``,
``h2' = h2 cos + h1 sin``, and ``q.k = q1'.k1' + q2'.k2'``. cos/sin are computed in the kernel from
the integer positions and ``inv_freq`` (float32, as Hugging Face does), so no table is stored.
A per-head q/k RMSNorm (Qwen3, Gemma 3) is applied to the rebuilt halves before the rotation (the
head's sum of squares is the two halves' sums), and a sliding window masks keys by cache index and
skips the key blocks it hides from the whole query block.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .reference import Factors, HeadNorm, Rope, default_positions
from .triton_common import _bias_arg, _check_device, _launch, _load_rows, _pad, _precision, _rebuild_cols


@triton.jit
def _rotate(x1, x2, pos, inv_freq_ptr, offs_h, HALF, rope_scale, ROPE: tl.constexpr):
    """Rotate the two halves of a rebuilt tile to ``pos`` (``[BLOCK]`` integers); identity without RoPE."""
    if ROPE:
        inv = tl.load(inv_freq_ptr + offs_h, mask=offs_h < HALF, other=0.0).to(tl.float32)
        angle = pos.to(tl.float32)[:, None] * inv[None, :]
        c = tl.cos(angle) * rope_scale
        s = tl.sin(angle) * rope_scale
        y1 = x1 * c - x2 * s
        y2 = x2 * c + x1 * s
    else:
        y1 = x1
        y2 = x2
    return y1, y2


@triton.jit
def _head_norm(x1, x2, w_ptr, offs_h, HALF, D, eps, NORM: tl.constexpr):
    """RMSNorm of each row's head (halves ``x1``, ``x2``; zero past ``HALF``) times ``weight``; identity without."""
    if NORM:
        inv = 1.0 / tl.sqrt((tl.sum(x1 * x1, 1) + tl.sum(x2 * x2, 1)) / D + eps)
        w1 = tl.load(w_ptr + offs_h, mask=offs_h < HALF, other=0.0).to(tl.float32)
        w2 = tl.load(w_ptr + HALF + offs_h, mask=offs_h < HALF, other=0.0).to(tl.float32)
        y1 = x1 * inv[:, None] * w1[None, :]
        y2 = x2 * inv[:, None] * w2[None, :]
    else:
        y1 = x1
        y2 = x2
    return y1, y2


@triton.jit
def _rank_space_attention_kernel(
    pq_ptr, pk_ptr, pv_ptr, uq_ptr, uk_ptr, uv_ptr, bq_ptr, bk_ptr, bv_ptr,
    qpos_ptr, kpos_ptr, mask_ptr, inv_freq_ptr, qnorm_ptr, knorm_ptr, o_ptr,
    SQ, SK, RQ, RK, RV, NUM_HEADS, GROUPS, D, HALF, scale, rope_scale, q_eps, k_eps, WINDOW,
    stride_pqb, stride_pqm, stride_pqr, stride_pkb, stride_pkn, stride_pkr,
    stride_pvb, stride_pvn, stride_pvr,
    stride_uq_n, stride_uq_r, stride_uk_n, stride_uk_r, stride_uv_n, stride_uv_r,
    stride_qpb, stride_qpm, stride_kpb, stride_kpn,
    stride_mb, stride_mn, stride_ob, stride_om, stride_on,
    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, ROPE: tl.constexpr,
    QNORM: tl.constexpr, KNORM: tl.constexpr, HAS_WINDOW: tl.constexpr,
    HAS_BQ: tl.constexpr, HAS_BK: tl.constexpr, HAS_BV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    RQ_PAD: tl.constexpr, RK_PAD: tl.constexpr, RV_PAD: tl.constexpr,
    H_PAD: tl.constexpr, D_PAD: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    b = tl.program_id(1) // NUM_HEADS
    h = tl.program_id(1) % NUM_HEADS
    kvh = h // GROUPS
    offset = SK - SQ  # queries are the last SQ keys
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < SQ
    offs_h = tl.arange(0, H_PAD)
    offs_d = tl.arange(0, D_PAD)

    pq = _load_rows(pq_ptr + b * stride_pqb, stride_pqm, stride_pqr, offs_m, mask_m, RQ, RQ_PAD)
    uq = uq_ptr + h * D * stride_uq_n
    q1 = _rebuild_cols(
        pq, uq, stride_uq_n, stride_uq_r, bq_ptr + h * D, offs_h, HALF, RQ, RQ_PAD, HAS_BQ, PREC
    )
    q2 = _rebuild_cols(
        pq, uq + HALF * stride_uq_n, stride_uq_n, stride_uq_r, bq_ptr + h * D + HALF, offs_h, HALF, RQ,
        RQ_PAD, HAS_BQ, PREC,
    )  # fmt: skip
    qpos = offs_m
    if ROPE:
        qpos = tl.load(qpos_ptr + b * stride_qpb + offs_m * stride_qpm, mask=mask_m, other=0)
    q1, q2 = _head_norm(q1, q2, qnorm_ptr, offs_h, HALF, D, q_eps, QNORM)
    q1, q2 = _rotate(q1, q2, qpos, inv_freq_ptr, offs_h, HALF, rope_scale, ROPE)
    q1 = q1 * scale
    q2 = q2 * scale

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, D_PAD), dtype=tl.float32)
    uk = uk_ptr + kvh * D * stride_uk_n
    lo = 0
    hi = SK
    if CAUSAL:
        hi = tl.minimum(SK, offset + (pid_m + 1) * BLOCK_M)
    if HAS_WINDOW:  # key blocks wholly outside every query's window are skipped
        lo = tl.maximum(0, offset + pid_m * BLOCK_M - WINDOW + 1) // BLOCK_N * BLOCK_N
        hi = tl.minimum(hi, offset + (pid_m + 1) * BLOCK_M - 1 + WINDOW)
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        in_range = offs_n < SK
        pk = _load_rows(pk_ptr + b * stride_pkb, stride_pkn, stride_pkr, offs_n, in_range, RK, RK_PAD)
        k1 = _rebuild_cols(
            pk, uk, stride_uk_n, stride_uk_r, bk_ptr + kvh * D, offs_h, HALF, RK, RK_PAD, HAS_BK, PREC
        )
        k2 = _rebuild_cols(
            pk, uk + HALF * stride_uk_n, stride_uk_n, stride_uk_r, bk_ptr + kvh * D + HALF, offs_h, HALF, RK,
            RK_PAD, HAS_BK, PREC,
        )  # fmt: skip
        kpos = offs_n
        if ROPE:
            kpos = tl.load(kpos_ptr + b * stride_kpb + offs_n * stride_kpn, mask=in_range, other=0)
        k1, k2 = _head_norm(k1, k2, knorm_ptr, offs_h, HALF, D, k_eps, KNORM)
        k1, k2 = _rotate(k1, k2, kpos, inv_freq_ptr, offs_h, HALF, rope_scale, ROPE)
        s = tl.dot(q1, tl.trans(k1), input_precision=PREC) + tl.dot(q2, tl.trans(k2), input_precision=PREC)
        visible = tl.full((BLOCK_M, BLOCK_N), 1, dtype=tl.int1)
        if HAS_MASK:
            keep = tl.load(mask_ptr + b * stride_mb + offs_n * stride_mn, mask=in_range, other=0)
            visible = visible & (keep != 0)[None, :]
        if CAUSAL:
            visible = visible & (offs_n[None, :] <= (offset + offs_m)[:, None])
        if HAS_WINDOW:
            distance = (offset + offs_m)[:, None] - offs_n[None, :]
            visible = visible & (distance < WINDOW) & (distance > -WINDOW)
        s = tl.where(visible, s, -1.0e30)  # reference.MASK_VALUE
        s = tl.where(in_range[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)

        pv = _load_rows(pv_ptr + b * stride_pvb, stride_pvn, stride_pvr, offs_n, in_range, RV, RV_PAD)
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


def rank_space_attention(
    pq: torch.Tensor,
    pk: torch.Tensor,
    pv: torch.Tensor,
    q: Factors,
    k: Factors,
    v: Factors,
    num_heads: int,
    num_kv_heads: int | None = None,
    key_mask: torch.Tensor | None = None,
    causal: bool = True,
    scale: float | None = None,
    q_pos: torch.Tensor | None = None,
    k_pos: torch.Tensor | None = None,
    rope: Rope | None = None,
    *,
    q_norm: HeadNorm | None = None,
    k_norm: HeadNorm | None = None,
    window: int | None = None,
    block_m: int = 32,
    block_n: int = 32,
) -> torch.Tensor:
    """Fused decoder attention from rank-space ``pq [B, S_q, r_q]`` and cached ``pk/pv [B, S_k, r]``.

    Same arguments and result as :func:`streamrank.kernels.reference.rank_space_attention`; the
    output ``[B, S_q, H*D]`` has ``pq``'s dtype. The head dimension must be even when ``rope`` is given.
    """
    _check_device(pq)
    num_kv_heads = num_kv_heads or num_heads
    batch, s_q, s_k = pq.shape[0], pq.shape[1], pk.shape[1]
    if s_q > s_k:
        raise ValueError(f"{s_q} queries but only {s_k} keys: the queries must be the last keys")
    head_dim = q.U.shape[0] // num_heads
    if head_dim % 2:
        raise ValueError(f"head_dim {head_dim} is odd: the kernel splits heads in halves")
    half = head_dim // 2
    scale = scale if scale is not None else 1.0 / math.sqrt(head_dim)
    out = torch.empty(batch, s_q, q.U.shape[0], dtype=pq.dtype, device=pq.device)
    if rope is not None:
        q_pos = default_positions(batch, s_k - s_q, s_k, pq.device) if q_pos is None else q_pos
        k_pos = default_positions(batch, 0, s_k, pq.device) if k_pos is None else k_pos
        q_pos, k_pos = q_pos.to(torch.int32), k_pos.to(torch.int32)
        inv_freq = rope.inv_freq.to(pq.device, torch.float32).contiguous()
        if inv_freq.numel() != half:
            raise ValueError(f"rope has {inv_freq.numel()} frequencies; head_dim {head_dim} needs {half}")
    else:
        q_pos = k_pos = torch.zeros(1, 1, dtype=torch.int32, device=pq.device)  # never read
        inv_freq = out
    mask = key_mask.to(torch.int8) if key_mask is not None else out  # placeholder when absent
    norms = [
        n.weight.to(pq.device, torch.float32).contiguous() if n is not None else out for n in (q_norm, k_norm)
    ]
    grid = (triton.cdiv(s_q, block_m), batch * num_heads)
    _launch(
        _rank_space_attention_kernel, grid, pq, pk, pv, q.U, k.U, v.U,
        _bias_arg(q.bias, q.U), _bias_arg(k.bias, k.U), _bias_arg(v.bias, v.U),
        q_pos, k_pos, mask, inv_freq, *norms, out,
        s_q, s_k, q.rank, k.rank, v.rank, num_heads, num_heads // num_kv_heads, head_dim, half, scale,
        float(rope.scaling) if rope is not None else 1.0,
        float(q_norm.eps) if q_norm is not None else 0.0, float(k_norm.eps) if k_norm is not None else 0.0,
        int(window or 0),
        *pq.stride(), *pk.stride(), *pv.stride(),
        q.U.stride(0), q.U.stride(1), k.U.stride(0), k.U.stride(1), v.U.stride(0), v.U.stride(1),
        q_pos.stride(0), q_pos.stride(1), k_pos.stride(0), k_pos.stride(1),
        mask.stride(0), mask.stride(1) if key_mask is not None else 0,
        out.stride(0), out.stride(1), out.stride(2),
        CAUSAL=causal, HAS_MASK=key_mask is not None, ROPE=rope is not None,
        QNORM=q_norm is not None, KNORM=k_norm is not None, HAS_WINDOW=window is not None,
        HAS_BQ=q.bias is not None, HAS_BK=k.bias is not None, HAS_BV=v.bias is not None,
        BLOCK_M=block_m, BLOCK_N=block_n,
        RQ_PAD=_pad(q.rank), RK_PAD=_pad(k.rank), RV_PAD=_pad(v.rank), H_PAD=_pad(half), D_PAD=_pad(head_dim),
        PREC=_precision(pq, pk, pv, q.U, k.U, v.U),
    )  # fmt: skip
    return out
