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

Supported model types: :data:`SUPPORTED_MODEL_TYPES` (Llama, Mistral, Qwen2, Qwen3, Gemma 3), with
full ``rotate_half`` RoPE of the default, linear, llama3 or yarn kind (one frequency set per layer:
Gemma 3's local and global ones), per-head q/k RMSNorm before RoPE (Qwen3: ``w``, Gemma 3: ``1 + w``),
sliding-window layers (the window masks cache indices, as Hugging Face's masks do; the rank-space cache
keeps every token), the model's own score scaling (Gemma 3's ``query_pre_attn_scalar``) and
bidirectional attention (EmbeddingGemma). A compressed RoPE decoder of another type, or with a feature
outside these (partial rotary, attention logit soft-capping, another RoPE kind), raises
:class:`UnsupportedDecoder` when a fused backend is asked for: it never falls back silently.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers.cache_utils import DynamicCache, DynamicLayer

from . import ops
from .reference import HeadNorm, Rope, key_mask_from_hf, project
from .svd import LowRankLinear

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma3", "gemma3_text")
"""``config.model_type`` of the decoders whose attention runs fused (``gemma3_text``: Gemma 3's text model)."""
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")
NORM_OFFSET = {"gemma3": 1.0, "gemma3_text": 1.0}
"""Added to the q/k norm weight: Gemma's RMSNorm multiplies by ``1 + w`` (Qwen3's by ``w``)."""


class UnsupportedDecoder(ValueError):
    """A compressed decoder whose attention the fused low-rank path cannot compute exactly."""


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
    """The rotary-embedding module beside a decoder stack's ``layers`` (``model.rotary_emb``), if any."""
    rotary = getattr(model, "rotary_emb", None)
    return rotary if isinstance(rotary, nn.Module) else None


def layer_rope(rotary: nn.Module, layer_type: str | None = None) -> Rope:
    """The RoPE of one layer: Gemma 3 keeps ``{layer_type}_inv_freq`` per layer type, others one ``inv_freq``."""
    prefix = f"{layer_type}_" if layer_type and hasattr(rotary, f"{layer_type}_inv_freq") else ""
    inv_freq = getattr(rotary, f"{prefix}inv_freq", None)
    if inv_freq is None:
        raise UnsupportedDecoder(f"{type(rotary).__name__} has no inv_freq: not a supported rotary embedding")
    return Rope(inv_freq, float(getattr(rotary, f"{prefix}attention_scaling", 1.0)))


def layer_ropes(model: nn.Module) -> list[Rope]:
    """The RoPE of each layer of ``model``'s decoder stack (the one module with ``layers`` and ``rotary_emb``)."""
    stacks = [
        m
        for m in model.modules()
        if isinstance(getattr(m, "layers", None), nn.ModuleList) and rotary_of(m) is not None
    ]
    if len(stacks) != 1:
        raise UnsupportedDecoder(f"expected one decoder stack with a rotary embedding, found {len(stacks)}")
    rotary = rotary_of(stacks[0])
    return [
        layer_rope(rotary, getattr(getattr(layer, "self_attn", None), "layer_type", None))
        for layer in stacks[0].layers
    ]


def _rope_type(rotary: nn.Module, layer_type: str | None) -> str:
    kind = getattr(rotary, "rope_type", "default")
    return kind.get(layer_type, "default") if isinstance(kind, dict) else kind


def head_norm(norm: nn.Module | None, model_type: str) -> HeadNorm | None:
    """The :class:`HeadNorm` of a Qwen3/Gemma 3 q/k RMSNorm module (None without one)."""
    if norm is None:
        return None
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
    if eps is None or getattr(norm, "weight", None) is None:
        raise UnsupportedDecoder(f"q/k norm {type(norm).__name__} is not an RMSNorm with a weight and eps")
    return HeadNorm(norm.weight.float() + NORM_OFFSET.get(model_type, 0.0), float(eps))


def sliding_window(attn: nn.Module) -> int | None:
    """The layer's sliding window: its own ``sliding_window`` (Qwen2/3, Gemma 3), else the config's (Mistral)."""
    if hasattr(attn, "sliding_window"):
        return attn.sliding_window
    return getattr(attn.config, "sliding_window", None)


def compressed_attention(layer: nn.Module) -> nn.Module | None:
    """``layer.self_attn`` when its q/k/v projections are low-rank (what the fused path computes)."""
    attn = getattr(layer, "self_attn", None)
    projections = [getattr(attn, name, None) for name in ("q_proj", "k_proj", "v_proj")]
    return attn if all(isinstance(p, LowRankLinear) for p in projections) else None


def check_supported(attn: nn.Module, rotary: nn.Module | None) -> None:
    """Raise :class:`UnsupportedDecoder` naming what the fused path does not cover in ``attn``."""
    model_type = getattr(getattr(attn, "config", None), "model_type", None)
    where = f"layer {getattr(attn, 'layer_idx', '?')} ({type(attn).__name__}, model_type {model_type!r})"
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedDecoder(
            f"{where}: the fused low-rank decoder attention supports model types "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}; use backend 'unfused' for this model"
        )
    if rotary is None:
        raise UnsupportedDecoder(f"{where}: no rotary embedding module (model.rotary_emb) beside the layers")
    layer_type = getattr(attn, "layer_type", None)
    rope_type = _rope_type(rotary, layer_type)
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedDecoder(
            f"{where}: RoPE type {rope_type!r} is not supported (supported: {', '.join(SUPPORTED_ROPE_TYPES)})"
        )
    head_dim = int(getattr(attn, "head_dim", 0))
    if head_dim % 2 or layer_rope(rotary, layer_type).inv_freq.numel() * 2 != head_dim:
        raise UnsupportedDecoder(
            f"{where}: RoPE must rotate the whole even head_dim (partial rotary is not supported)"
        )
    if getattr(attn, "attn_logit_softcapping", None) is not None:
        raise UnsupportedDecoder(f"{where}: attention logit soft-capping is not supported")


def fused_layers(model: nn.Module) -> list[tuple[nn.Module, nn.Module]]:
    """``(attention, rotary)`` of every compressed decoder layer in ``model``, checked by :func:`check_supported`.

    A decoder stack is a module with ``layers`` whose rotary embedding sits beside them, or whose
    attention is causal; a compressed layer of a stack the fused path does not cover raises.
    """
    found = []
    for module in model.modules():
        layers = getattr(module, "layers", None)
        if not isinstance(layers, nn.ModuleList):
            continue
        rotary = rotary_of(module)
        for layer in layers:
            attn = compressed_attention(layer)
            if attn is None or (rotary is None and not getattr(attn, "is_causal", False)):
                continue
            check_supported(attn, rotary)
            found.append((attn, rotary))
    return found


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
    """An empty cache for ``model``: rank-space when its attention is fused, else a dense DynamicCache.

    The dense cache has plain layers that keep every token, sliding-window layers too (the model's masks
    apply the window), so a prefix can be cropped back and a sink cache can evict from it.
    """
    if uses_rank_space(model):
        config = model.config.get_text_config(decoder=True) if hasattr(model, "config") else None
        return RankSpaceCache(int(config.num_hidden_layers))
    return DynamicCache()


class FusedLlamaAttention(nn.Module):
    """Llama-family attention over the fused low-rank kernels, reading/writing a :class:`RankSpaceCache`.

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
        causal, window = bool(getattr(self, "is_causal", True)), sliding_window(self)
        ok, key_mask = key_mask_from_hf(attention_mask, causal, window)
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
                    "(attention mask beyond padding, causality and the sliding window, or dropout), so it "
                    "cannot use a rank-space cache"
                )
            ops.note("llama_attention", "hf")
            return super().forward(hidden_states, position_embeddings, attention_mask, cache, **kwargs)
        q, k, v = self.q_proj.factors(), self.k_proj.factors(), self.v_proj.factors()
        pq, pk, pv = project(hidden_states, q.V), project(hidden_states, k.V), project(hidden_states, v.V)
        positions = position_ids.to(hidden_states.device).expand(hidden_states.shape[0], -1)
        k_pos = positions
        if rank_cache:
            pk, pv, k_pos = cache.append(self.layer_idx, pk, pv, positions)
        config = self.config
        model_type = config.model_type
        context = ops.rank_space_attention(
            pq, pk, pv, q, k, v, config.num_attention_heads, config.num_key_value_heads,
            key_mask=key_mask, causal=causal, scale=self.scaling, q_pos=positions, k_pos=k_pos,
            rope=layer_rope(self.lowrank_rope[0], getattr(self, "layer_type", None)), backend=backend,
            q_norm=head_norm(getattr(self, "q_norm", None), model_type),
            k_norm=head_norm(getattr(self, "k_norm", None), model_type), window=window,
        )  # fmt: skip
        return self.o_proj(context), None
