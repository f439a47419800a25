"""Streaming torch path: the blocking of the Triton kernels done with torch ops, for CPU.

- FFN: the rank-space activations ``x V_up^T`` (and ``x V_gate^T``) are computed once; the
  intermediate dimension is walked in blocks of ``block_ff`` columns, each block's activation is
  pushed straight into the rank space of the down projection, so no ``[tokens, d_ff]`` tensor exists.
- attention: the rank-space ``P = x V^T`` of Q, K and V are computed once (``[tokens, r]``); for
  each query block the Q tile is rebuilt from its factors, then key/value tiles are rebuilt block by
  block and folded in with an online softmax, so neither full Q/K/V nor the score matrix exists.

The math of each piece lives in :mod:`streamrank.kernels.reference`; this module only adds the
blocking and the online softmax.
"""

from __future__ import annotations

import math

import torch

from .reference import (
    Factors,
    HeadNorm,
    Rope,
    allowed_keys,
    apply_rope,
    default_positions,
    ffn_activation,
    head_rms_norm,
    masked_scores,
    merge_heads,
    project,
    rebuild,
    repeat_kv,
    split_heads,
)

DEFAULT_BLOCK_FF = 256
DEFAULT_BLOCK_Q = 256
DEFAULT_BLOCK_K = 128


def _cols(f: Factors, sl: slice) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Rows ``sl`` of ``U`` (and the bias): the output columns ``sl`` of a low-rank layer."""
    return f.U[sl], None if f.bias is None else f.bias[sl]


def lowrank_ffn(
    x: torch.Tensor,
    up: Factors,
    down: Factors,
    activation: str = "gelu",
    gate: Factors | None = None,
    block_ff: int = DEFAULT_BLOCK_FF,
) -> torch.Tensor:
    """Low-rank FFN streamed over blocks of the intermediate dimension (same result as the reference)."""
    p_up = project(x, up.V)
    p_gate = project(x, gate.V) if gate is not None else None
    d_ff = up.U.shape[0]
    z = None  # rank-space accumulator of the down projection, [..., r_down]
    for start in range(0, d_ff, block_ff):
        sl = slice(start, min(start + block_ff, d_ff))
        g = rebuild(p_gate, *_cols(gate, sl)) if gate is not None else None
        h = ffn_activation(rebuild(p_up, *_cols(up, sl)), g, activation)
        part = project(h, down.V[:, sl])
        z = part if z is None else z.add_(part)
        del g, h, part
    return rebuild(z, down.U, down.bias)


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
    block_q: int = DEFAULT_BLOCK_Q,
    block_k: int = DEFAULT_BLOCK_K,
) -> torch.Tensor:
    """Blockwise :func:`~streamrank.kernels.reference.rank_space_attention` (same arguments and result).

    ``pq`` is ``[B, S_q, r_q]``, ``pk/pv`` ``[B, S_k, r]`` (``S_q <= S_k``: the queries are the last
    keys, as after a KV cache). Q tiles are rebuilt per query block, K/V tiles per key block, each
    normalised per head and rotated to its positions when asked, and folded in with an online softmax;
    key blocks a causal mask or the sliding ``window`` hides from a whole query block are skipped.
    Scores and softmax state are kept in float32; the output has the dtype of ``pq``.
    """
    num_kv_heads = num_kv_heads or num_heads
    groups = num_heads // num_kv_heads
    batch, s_q, s_k = pq.shape[0], pq.shape[1], pk.shape[1]
    if s_q > s_k:
        raise ValueError(f"{s_q} queries but only {s_k} keys: the queries must be the last keys")
    offset = s_k - s_q
    head_dim = q.U.shape[0] // num_heads
    scale = scale if scale is not None else 1.0 / math.sqrt(head_dim)
    if rope is not None:
        q_pos = default_positions(batch, offset, s_k, pq.device) if q_pos is None else q_pos
        k_pos = default_positions(batch, 0, s_k, pq.device) if k_pos is None else k_pos
    index = torch.arange(s_k, device=pq.device)
    out = torch.empty(batch, s_q, q.U.shape[0], dtype=pq.dtype, device=pq.device)
    for q0 in range(0, s_q, block_q):
        q1 = min(q0 + block_q, s_q)
        qh = head_rms_norm(split_heads(rebuild(pq[:, q0:q1], q.U, q.bias), num_heads).float(), q_norm)
        if rope is not None:
            qh = apply_rope(qh, q_pos[:, q0:q1], rope)
        m = torch.full((*qh.shape[:3], 1), -math.inf, device=pq.device)
        denom = torch.zeros_like(m)
        acc = torch.zeros_like(qh)
        k_end = offset + q1 if causal else s_k  # keys after the block's last query are all masked
        k_start = 0
        if window is not None:  # keys a window or more before the block's first query are all masked
            k_start = max(0, offset + q0 - window + 1)
            k_end = min(k_end, offset + q1 - 1 + window)
        for k0 in range(k_start, k_end, block_k):
            k1 = min(k0 + block_k, k_end)
            kh = head_rms_norm(split_heads(rebuild(pk[:, k0:k1], k.U, k.bias), num_kv_heads).float(), k_norm)
            if rope is not None:
                kh = apply_rope(kh, k_pos[:, k0:k1], rope)
            kh = repeat_kv(kh, groups)
            vh = repeat_kv(split_heads(rebuild(pv[:, k0:k1], v.U, v.bias), num_kv_heads), groups).float()
            allowed = allowed_keys(key_mask, causal, index[offset + q0 : offset + q1], index[k0:k1], window)
            s = masked_scores(qh, kh, scale, allowed)
            m_new = torch.maximum(m, s.amax(dim=-1, keepdim=True))
            alpha = torch.exp(m - m_new)
            p = s.sub_(m_new).exp_()
            denom.mul_(alpha).add_(p.sum(dim=-1, keepdim=True))
            acc.mul_(alpha).add_(torch.matmul(p, vh))
            m = m_new
            del kh, vh, s, p
        out[:, q0:q1] = merge_heads(acc.div_(denom)).to(out.dtype)
        del qh, acc
    return out


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
    block_q: int = DEFAULT_BLOCK_Q,
    block_k: int = DEFAULT_BLOCK_K,
) -> torch.Tensor:
    """Self-attention context ``[B, S, H*D]`` computed block by block (same result as the reference)."""
    return rank_space_attention(
        project(x, q.V),
        project(x, k.V),
        project(x, v.V),
        q,
        k,
        v,
        num_heads,
        num_kv_heads,
        key_mask,
        causal,
        scale,
        block_q=block_q,
        block_k=block_k,
    )
