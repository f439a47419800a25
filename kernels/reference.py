"""Plain torch reference of the low-rank math (the "unfused" path).

Every fused implementation (the Triton kernels, the streaming torch path) computes the same
functions as this module; tests compare against it. Conventions:

- a low-rank linear layer is ``Factors(U, V, bias)`` with ``W ~= U @ V``, ``U: [out, r]``,
  ``V: [r, in]``; ``y = (x V^T) U^T + b``. ``x V^T`` is the *rank-space* activation.
- attention inputs/outputs are ``[batch, seq, heads * head_dim]`` (head-major last dim, as in
  Hugging Face models); ``key_mask`` is ``[batch, seq_k]`` bool, True where a key may be attended.
- decoder attention (:func:`rank_space_attention`) reads rank-space Q/K/V (``x V^T``, what the
  rank-space KV cache holds), rebuilds them with ``U``, normalises each head of Q and K when the model
  has q/k norms (:class:`HeadNorm`: Qwen3, Gemma 3) and applies rotary positions (:class:`Rope`, the
  ``rotate_half`` layout of the Llama family) to the rebuilt Q and K. With ``seq_q < seq_k`` the
  queries are the *last* ``seq_q`` keys (a continuation after a cache): causality is bottom-right aligned.
- a sliding ``window`` (Mistral, sliding layers of Qwen2/3 and Gemma 3) hides keys ``window`` or more
  *cache indices* behind the query (``|q - k| >= window`` when not causal), as Hugging Face's masks do.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

# Score given to masked (padding / future) keys. Finite, so a fully masked row gives a uniform
# average instead of NaN; any row with one visible key gives exactly 0 weight to masked keys.
MASK_VALUE = -1.0e30

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F.gelu,
    "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"),
    "silu": F.silu,
    "relu": F.relu,
}


class Rope(NamedTuple):
    """Rotary position embedding: angle ``position * inv_freq`` (``[head_dim / 2]``), cos/sin times ``scaling``."""

    inv_freq: torch.Tensor
    scaling: float = 1.0


class HeadNorm(NamedTuple):
    """RMSNorm over each head's ``head_dim``, applied to Q or K before RoPE: ``t / rms(t) * weight``.

    ``weight`` (``[head_dim]``) is the effective multiplier: Qwen3's ``w``, Gemma 3's ``1 + w``.
    """

    weight: torch.Tensor
    eps: float


class Factors(NamedTuple):
    """Factors of one low-rank linear layer: ``W ~= U @ V`` plus an optional bias."""

    U: torch.Tensor
    V: torch.Tensor
    bias: torch.Tensor | None = None

    @property
    def rank(self) -> int:
        return self.V.shape[0]


def project(x: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """Rank-space activation ``x V^T`` (``[..., in] -> [..., r]``)."""
    return F.linear(x, V)


def rebuild(p: torch.Tensor, U: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Lift a rank-space activation back to the output space: ``p U^T + b``."""
    return F.linear(p, U, bias)


def lowrank_linear(x: torch.Tensor, f: Factors) -> torch.Tensor:
    """``y = (x V^T) U^T + b``, the rank-r intermediate materialised."""
    return rebuild(project(x, f.V), f.U, f.bias)


def ffn_activation(up: torch.Tensor, gate: torch.Tensor | None, activation: str) -> torch.Tensor:
    """FFN hidden activation from pre-activations: ``act(up)``, or ``act(gate) * up`` when gated."""
    act = ACTIVATIONS[activation]
    return act(up) if gate is None else act(gate) * up


def lowrank_ffn(
    x: torch.Tensor, up: Factors, down: Factors, activation: str = "gelu", gate: Factors | None = None
) -> torch.Tensor:
    """Low-rank FFN ``down(act(up(x)))`` (BERT) or ``down(act(gate(x)) * up(x))`` (Llama)."""
    g = lowrank_linear(x, gate) if gate is not None else None
    return lowrank_linear(ffn_activation(lowrank_linear(x, up), g, activation), down)


def split_heads(t: torch.Tensor, num_heads: int) -> torch.Tensor:
    """``[B, S, H*D] -> [B, H, S, D]``."""
    b, s, _ = t.shape
    return t.view(b, s, num_heads, -1).transpose(1, 2)


def merge_heads(t: torch.Tensor) -> torch.Tensor:
    """``[B, H, S, D] -> [B, S, H*D]``."""
    b, h, s, d = t.shape
    return t.transpose(1, 2).reshape(b, s, h * d)


def repeat_kv(t: torch.Tensor, groups: int) -> torch.Tensor:
    """Grouped-query attention: repeat each key/value head ``groups`` times (``[B, Hkv, S, D]``)."""
    if groups == 1:
        return t
    b, h, s, d = t.shape
    return t[:, :, None].expand(b, h, groups, s, d).reshape(b, h * groups, s, d)


def allowed_keys(
    key_mask: torch.Tensor | None,
    causal: bool,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    window: int | None = None,
) -> torch.Tensor | None:
    """Bool ``[B|1, 1, q, k]`` of visible keys for query indices ``q_pos`` and key indices ``k_pos``.

    ``window``: keys at ``window`` or more indices from the query are hidden (behind it when ``causal``).
    """
    allowed = None
    if key_mask is not None:
        allowed = key_mask[:, None, None, k_pos].bool()
    rules = []
    if causal:
        rules.append(k_pos[None, :] <= q_pos[:, None])
    if window is not None:
        rules.append((q_pos[:, None] - k_pos[None, :]).abs() < window)
    for rule in rules:
        allowed = rule[None, None] if allowed is None else allowed & rule[None, None]
    return allowed


def masked_scores(
    q: torch.Tensor, k: torch.Tensor, scale: float, allowed: torch.Tensor | None
) -> torch.Tensor:
    """Scaled scores ``q k^T * scale`` (``[B, H, q, k]``) with invisible keys set to ``MASK_VALUE``."""
    s = torch.matmul(q, k.transpose(-1, -2)).mul_(scale)
    if allowed is not None:
        s.masked_fill_(~allowed, max(MASK_VALUE, torch.finfo(s.dtype).min))  # fp16 cannot hold -1e30
    return s


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    num_heads: int,
    num_kv_heads: int | None = None,
    key_mask: torch.Tensor | None = None,
    causal: bool = False,
    scale: float | None = None,
) -> torch.Tensor:
    """Standard multi-head (or grouped-query) attention with the full score matrix materialised."""
    num_kv_heads = num_kv_heads or num_heads
    qh = split_heads(q, num_heads)
    kh = repeat_kv(split_heads(k, num_kv_heads), num_heads // num_kv_heads)
    vh = repeat_kv(split_heads(v, num_kv_heads), num_heads // num_kv_heads)
    scale = scale if scale is not None else 1.0 / math.sqrt(qh.shape[-1])
    pos_q = torch.arange(q.shape[1], device=q.device)
    pos_k = torch.arange(k.shape[1], device=q.device)
    s = masked_scores(qh, kh, scale, allowed_keys(key_mask, causal, pos_q, pos_k))
    return merge_heads(torch.matmul(torch.softmax(s, dim=-1), vh))


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
) -> torch.Tensor:
    """Self-attention context ``[B, S, H*D]`` with Q/K/V from low-rank projections of ``x``."""
    return attention(
        lowrank_linear(x, q),
        lowrank_linear(x, k),
        lowrank_linear(x, v),
        num_heads,
        num_kv_heads,
        key_mask,
        causal,
        scale,
    )


def rope_tables(positions: torch.Tensor, rope: Rope) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos, sin`` of shape ``[B, S, head_dim]`` (float32) for integer ``positions`` ``[B, S]``."""
    angle = positions[..., None].float() * rope.inv_freq.to(positions.device, torch.float32)
    emb = torch.cat([angle, angle], dim=-1)
    return emb.cos() * rope.scaling, emb.sin() * rope.scaling


def apply_rope(t: torch.Tensor, positions: torch.Tensor, rope: Rope) -> torch.Tensor:
    """Rotate ``t`` (``[B, H, S, D]``) to ``positions`` (``[B, S]``), ``rotate_half`` layout, in float32."""
    cos, sin = rope_tables(positions, rope)
    cos, sin = cos[:, None], sin[:, None]
    t = t.float()
    half = t.shape[-1] // 2
    return t * cos + torch.cat([-t[..., half:], t[..., :half]], dim=-1) * sin


def head_rms_norm(t: torch.Tensor, norm: HeadNorm | None) -> torch.Tensor:
    """``t`` (``[B, H, S, D]``) normalised per head in float32 (unchanged when ``norm`` is None)."""
    if norm is None:
        return t
    t = t.float()
    return (
        t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + norm.eps) * norm.weight.to(t.device, torch.float32)
    )


def default_positions(batch: int, start: int, stop: int, device: torch.device) -> torch.Tensor:
    """Positions ``start .. stop-1`` for every row: ``[batch, stop - start]``."""
    return torch.arange(start, stop, device=device).expand(batch, -1)


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
) -> torch.Tensor:
    """Attention context ``[B, S_q, H*D]`` from rank-space ``pq [B, S_q, r_q]``, ``pk/pv [B, S_k, r]``.

    Q/K/V are rebuilt in full (``p U^T + b``), Q and K normalised per head (``q_norm`` / ``k_norm``)
    and rotated to ``q_pos`` / ``k_pos`` (``[B, S]`` integer positions; default: the key indices, the
    queries being the last ``S_q`` of them) when ``rope`` is given. ``key_mask`` is ``[B, S_k]``;
    ``window`` a sliding window in cache indices. Computed in float32, returned in ``pq``'s dtype.
    """
    num_kv_heads = num_kv_heads or num_heads
    groups = num_heads // num_kv_heads
    batch, s_q, s_k = pq.shape[0], pq.shape[1], pk.shape[1]
    if s_q > s_k:
        raise ValueError(f"{s_q} queries but only {s_k} keys: the queries must be the last keys")
    qh = head_rms_norm(split_heads(rebuild(pq, q.U, q.bias), num_heads).float(), q_norm)
    kh = head_rms_norm(split_heads(rebuild(pk, k.U, k.bias), num_kv_heads).float(), k_norm)
    vh = split_heads(rebuild(pv, v.U, v.bias), num_kv_heads).float()
    if rope is not None:
        q_pos = default_positions(batch, s_k - s_q, s_k, pq.device) if q_pos is None else q_pos
        k_pos = default_positions(batch, 0, s_k, pq.device) if k_pos is None else k_pos
        qh, kh = apply_rope(qh, q_pos, rope), apply_rope(kh, k_pos, rope)
    scale = scale if scale is not None else 1.0 / math.sqrt(qh.shape[-1])
    index_k = torch.arange(s_k, device=pq.device)
    allowed = allowed_keys(key_mask, causal, index_k[s_k - s_q :], index_k, window)
    s = masked_scores(qh, repeat_kv(kh, groups), scale, allowed)
    return merge_heads(torch.matmul(torch.softmax(s, dim=-1), repeat_kv(vh, groups))).to(pq.dtype)


def key_mask_from_hf(
    attention_mask: Any, causal: bool, window: int | None = None
) -> tuple[bool, torch.Tensor | None]:
    """Reduce a Hugging Face 4-D attention mask (bool, or additive with 0 = visible) to ``[B, S_k]``.

    Returns ``(ok, key_mask)``; ``ok`` is False when the mask is more than key padding (plus the
    bottom-right aligned causal triangle when ``causal``, and the sliding ``window``): the caller must
    use the original attention. A key no query sees is marked masked.
    """
    if attention_mask is None:
        return True, None
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 4:
        return False, None
    keep = attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0
    key_mask = keep[:, 0].any(dim=-2)  # keys some query sees: the padding mask where a window hides none
    q_len, k_len = keep.shape[-2:]
    pos = torch.arange(k_len, device=keep.device)
    expected = allowed_keys(key_mask, causal, pos[k_len - q_len :], pos, window)
    if not torch.equal(keep, expected.expand_as(keep)):
        return False, None
    return True, key_mask
