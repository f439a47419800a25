"""Llama-style decoder attention on the fused low-rank path, with a rank-space KV cache.

A compressed attention layer has ``K = (x V_k^T) U_k^T`` and ``V = (x V_v^T) U_v^T``. The
:class:`RankSpaceCache` stores the rank-space projections ``x V_k^T`` and ``x V_v^T`` (``r_k + r_v``
numbers per token and layer instead of ``2 * kv_heads * head_dim``) and each token's position;
:class:`FusedLlamaAttention` rebuilds K/V from them at attention time, in tiles
(:func:`streamrank.kernels.ops.rank_space_attention`: Triton on CUDA, the streaming torch path on CPU),
applying RoPE to the rebuilt Q/K. Because the cache is *before* RoPE, re-indexing positions (the
StreamingLLM sink cache) is a change of the stored positions, exact, with no re-rotation.

A cache is a transformers :class:`~transformers.DynamicCache` whose layers are :class:`RankSpaceLayer`:
``get_seq_length``, masks, ``crop``, ``batch_repeat_interleave`` behave as for a dense cache. Only the
fused attention writes it; a layer that falls back to the model's own attention (an attention mask
that is more than padding + causal, attention dropout in training) cannot use it and raises.

Supported: Llama and Qwen2 attention (no sliding window, no q/k norms) with full ``rotate_half`` RoPE
of the default, linear, llama3 or yarn kind; other models keep their own attention.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers.cache_utils import DynamicCache, DynamicLayer

from . import ops
from .reference import Rope, key_mask_from_hf, project
from .svd import LowRankLinear

SUPPORTED_MODEL_TYPES = ("llama", "qwen2")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


class RankSpaceLayer(DynamicLayer):
    """One layer of a rank-space cache: ``keys [B, S, r_k]``, ``values [B, S, r_v]``, ``positions [B, S]``."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.positions: torch.Tensor | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.is_initialized = True

    def update(self, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        raise TypeError(
            "a rank-space KV cache holds x V^T, not keys and values: only the fused low-rank attention "
            "(streamrank.kernels.decoder) can use it"
        )

    def append(
        self, pk: torch.Tensor, pv: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Add rank-space keys/values ``[B, S, r]`` at ``positions`` ``[B, S]``; return everything cached."""
        positions = positions.to(torch.int32)
        if not self.is_initialized or self.keys is None or not self.keys.numel():
            self.lazy_initialization(pk, pv)
            self.keys, self.values, self.positions = pk, pv, positions
        else:
            self.keys = torch.cat([self.keys, pk], dim=-2)
            self.values = torch.cat([self.values, pv], dim=-2)
            self.positions = torch.cat([self.positions, positions], dim=-1)
        return self.keys, self.values, self.positions

    def keep(self, index: torch.Tensor | slice, positions: torch.Tensor | None = None) -> None:
        """Keep the cached tokens ``index`` (a copy: the dropped ones' storage is freed), optionally re-positioned."""
        self.keys = self.keys[:, index].clone()
        self.values = self.values[:, index].clone()
        self.positions = (self.positions[:, index] if positions is None else positions).clone()

    def reset(self) -> None:
        super().reset()
        self.positions = None

    def crop(self, tokens_to_remove: int) -> None:
        super().crop(tokens_to_remove)
        if tokens_to_remove and self.positions is not None:
            self.positions = self.positions[..., : -abs(tokens_to_remove)]

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        if self.positions is not None:
            self.positions = self.positions.repeat_interleave(repeats, dim=0)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        if self.positions is not None:
            self.positions = self.positions[indices]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        if self.positions is not None and self.get_seq_length() > 0:
            self.positions = self.positions.index_select(0, beam_idx.to(self.positions.device))


class RankSpaceCache(DynamicCache):
    """A KV cache of rank-space projections, one :class:`RankSpaceLayer` per decoder layer."""

    def __init__(self, num_layers: int) -> None:
        super().__init__()
        self.layers = [RankSpaceLayer() for _ in range(num_layers)]
        self.layer_class_to_replicate = None

    def append(
        self, layer_idx: int, pk: torch.Tensor, pv: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.layers[layer_idx].append(pk, pv, positions)


def rotary_of(model: nn.Module) -> nn.Module | None:
    """The single rotary-embedding module of a decoder stack (``model.rotary_emb``), if it is supported."""
    rotary = getattr(model, "rotary_emb", None)
    if rotary is None or not hasattr(rotary, "inv_freq"):
        return None
    if getattr(rotary, "rope_type", "default") not in SUPPORTED_ROPE_TYPES:
        return None
    return rotary


def supports(attn: nn.Module, rotary: nn.Module) -> bool:
    """True when ``attn`` is a compressed Llama/Qwen2 attention the fused path computes exactly."""
    config = getattr(attn, "config", None)
    projections = [getattr(attn, name, None) for name in ("q_proj", "k_proj", "v_proj")]
    if config is None or not all(isinstance(p, LowRankLinear) for p in projections):
        return False
    if getattr(config, "model_type", None) not in SUPPORTED_MODEL_TYPES:
        return False
    if getattr(config, "use_sliding_window", False) or hasattr(attn, "q_norm") or hasattr(attn, "k_norm"):
        return False
    head_dim = getattr(attn, "head_dim", 0)
    return head_dim % 2 == 0 and rotary.inv_freq.numel() * 2 == head_dim


def uses_rank_space(model: nn.Module) -> bool:
    """True when every attention layer of ``model`` runs the fused path (then its cache is rank-space)."""
    found = False
    for module in model.modules():
        if hasattr(module, "q_proj") and hasattr(module, "o_proj"):
            if not isinstance(module, FusedLlamaAttention) or module.lowrank_backend == "unfused":
                return False
            found = True
    return found


def new_cache(model: nn.Module) -> DynamicCache:
    """An empty cache for ``model``: rank-space when its attention is fused, else a dense DynamicCache."""
    if uses_rank_space(model):
        config = model.config.get_text_config(decoder=True) if hasattr(model, "config") else None
        return RankSpaceCache(int(config.num_hidden_layers))
    return DynamicCache(config=getattr(model, "config", None))


class FusedLlamaAttention(nn.Module):
    """Llama attention over the fused low-rank kernels, reading/writing a :class:`RankSpaceCache`.

    Mixed into the model's attention class by :func:`streamrank.kernels.lowrank.set_backend`, which
    sets ``lowrank_backend`` and ``lowrank_rope`` (a one-element tuple holding the model's rotary module,
    kept out of the module tree). Returns ``(output, None)``: attention weights are never formed.
    """

    lowrank_backend = "auto"
    lowrank_rope: tuple[nn.Module, ...] = ()

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: Any = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        backend = ops.resolve_backend(self.lowrank_backend, hidden_states.device)
        rank_cache = isinstance(cache, RankSpaceCache)
        ok, key_mask = key_mask_from_hf(attention_mask, causal=True)
        position_ids = kwargs.get("position_ids")
        unsupported = (
            not ok
            or (cache is not None and not rank_cache)
            or position_ids is None
            or not self.lowrank_rope
            or (self.training and self.attention_dropout > 0)
        )
        if backend == "unfused" or unsupported:
            if rank_cache:
                raise RuntimeError(
                    f"layer {self.layer_idx}: this call cannot run on the fused low-rank attention "
                    "(attention mask beyond padding + causal, or dropout), so it cannot use a rank-space cache"
                )
            ops.note("llama_attention", "hf")
            return super().forward(hidden_states, position_embeddings, attention_mask, cache, **kwargs)
        q, k, v = self.q_proj.factors(), self.k_proj.factors(), self.v_proj.factors()
        pq, pk, pv = project(hidden_states, q.V), project(hidden_states, k.V), project(hidden_states, v.V)
        positions = position_ids.to(hidden_states.device).expand(hidden_states.shape[0], -1)
        k_pos = positions
        if rank_cache:
            pk, pv, k_pos = cache.append(self.layer_idx, pk, pv, positions)
        rotary = self.lowrank_rope[0]
        rope = Rope(rotary.inv_freq, float(getattr(rotary, "attention_scaling", 1.0)))
        config = self.config
        context = ops.rank_space_attention(
            pq, pk, pv, q, k, v, config.num_attention_heads, config.num_key_value_heads,
            key_mask=key_mask, causal=True, scale=self.scaling, q_pos=positions, k_pos=k_pos, rope=rope,
            backend=backend,
        )  # fmt: skip
        return self.o_proj(context), None
