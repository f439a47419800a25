"""Plain torch reference of the low-rank math (the "unfused" path).

Every fused implementation (the Triton kernels, the streaming torch path) computes the same
functions as this module; tests compare against it. Conventions:

- a low-rank linear layer is ``Factors(U, V, bias)`` with ``W ~= U @ V``, ``U: [out, r]``,
  ``V: [r, in]``; ``y = (x V^T) U^T + b``. ``x V^T`` is the *rank-space* activation.
- attention inputs/outputs are ``[batch, seq, heads * head_dim]`` (head-major last dim, as in
  Hugging Face models); ``key_mask`` is ``[batch, seq_k]`` bool, True where a key may be attended.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

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
    key_mask: torch.Tensor | None, causal: bool, q_pos: torch.Tensor, k_pos: torch.Tensor
) -> torch.Tensor | None:
    """Bool ``[B|1, 1, q, k]`` of visible keys for query positions ``q_pos`` and key positions ``k_pos``."""
    allowed = None
    if key_mask is not None:
        allowed = key_mask[:, None, None, k_pos].bool()
    if causal:
        tri = (k_pos[None, :] <= q_pos[:, None])[None, None]
        allowed = tri if allowed is None else allowed & tri
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
