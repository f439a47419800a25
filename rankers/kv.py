"""KV-cache reuse for the LLM rerankers.

- :class:`PrefixCache`: the instruction + query part of a prompt is run once per query; every window
  or group of that query continues from its KV cache. :meth:`PrefixCache.borrow` hands out the cache
  for one use and crops it back to the prefix afterwards, so candidates *stream through a fixed
  cache*: memory is the prefix plus one window/group, however long the candidate list. The prefix
  is what every later token attends to first, so it also plays the attention sink's role.
- :class:`SinkCache`: the generic StreamingLLM cache (Xiao et al., 2023) for token streams longer
  than any cache: the first ``sink`` tokens + the most recent ``window`` tokens are kept.

Positions inside a :class:`SinkCache` are re-indexed, as in StreamingLLM: after evicting ``d`` tokens,
the kept recent keys are moved ``d`` positions down by *re-rotating* them (RoPE rotations compose:
R(p - d) = R(-d) R(p)). We re-rotate rather than store pre-RoPE keys because re-rotation works with
the stock attention code of every Hugging Face RoPE model (pre-RoPE caching would need a patched
attention forward per model family), costs one elementwise pass over the kept window per eviction,
and is exact up to float rounding (checked in the tests: the re-rotated keys equal keys computed
fresh at the new positions). Supported: the ``rotate_half`` RoPE layout of the Llama family
(Llama, SmolLM, Qwen, Mistral, Gemma), each layer with its own frequencies (Gemma 3's local/global).

A low-rank model whose attention runs on the fused kernels caches rank-space projections instead
(:class:`streamrank.kernels.decoder.RankSpaceCache`: ``x V_k^T``, ``x V_v^T`` and each token's position,
before RoPE). Both classes work on it unchanged in what they compute: cropping and batch repeats
carry the positions along, and the sink cache re-indexes by shifting the stored positions (RoPE is
applied at attention time), which is exact with no re-rotation.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from streamrank.errors import RankerError

if TYPE_CHECKING:
    import torch

    from streamrank.rankers.causal_lm import CausalLM


def cache_length(cache: Any) -> int:
    return int(cache.get_seq_length()) if cache is not None else 0


def kv_bytes(cache: Any) -> int:
    """Bytes held by the cache's key/value tensors, and a rank-space cache's positions (whole storages)."""
    seen: dict[int, int] = {}
    for layer in getattr(cache, "layers", ()):
        tensors = (getattr(layer, name, None) for name in ("keys", "values", "positions"))
        for tensor in tensors:
            if tensor is not None and tensor.numel():
                storage = tensor.untyped_storage()
                seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def crop_to(cache: Any, length: int) -> None:
    """Drop every cached position from ``length`` on, freeing the storage (copies the kept part)."""
    for layer in cache.layers:
        cumulative = getattr(layer, "cumulative_length", None)  # sliding-window layers (Mistral) count tokens seen
        if cumulative is not None and getattr(layer, "keys", None) is not None:
            if cumulative > layer.keys.shape[-2] and length > 0:
                raise RankerError(
                    "the sliding-window KV cache already dropped the start of the prompt (prompt longer than "
                    "the model's sliding window); lower context_size or the window"
                )
            layer.cumulative_length = min(cumulative, length)
        if getattr(layer, "keys", None) is None or not layer.keys.numel() or layer.keys.shape[-2] <= length:
            continue
        if getattr(layer, "positions", None) is not None:  # rank-space layer: [B, S, r] and positions
            layer.keep(slice(0, length))
            continue
        layer.keys = layer.keys[..., :length, :].clone()
        layer.values = layer.values[..., :length, :].clone()


class PrefixCache:
    """The KV cache of a prompt prefix, computed once and reused by many continuations."""

    def __init__(self, llm: CausalLM, ids: Sequence[int]) -> None:
        import torch

        if not ids:
            raise ValueError("a prefix needs at least one token")
        started = time.perf_counter()
        self.llm = llm
        self.ids = list(ids)
        self.cache = llm.new_cache()
        with torch.inference_mode():
            llm.forward_ids(
                torch.tensor([self.ids]),
                None,
                torch.arange(len(self.ids)).unsqueeze(0),
                self.cache,
                torch.tensor([len(self.ids) - 1]),
            )
        self.seconds = time.perf_counter() - started
        self.base_bytes = kv_bytes(self.cache)
        self.peak_bytes = self.base_bytes
        self.uses = 0

    @property
    def length(self) -> int:
        return len(self.ids)

    @property
    def computed_tokens(self) -> int:
        """Tokens computed to build the prefix (paid once per query)."""
        return len(self.ids)

    @contextmanager
    def borrow(self, batch: int = 1) -> Iterator[Any]:
        """The cache for one forward over ``batch`` continuations.

        Batch 1 streams through the shared cache and crops it back to the prefix afterwards (no
        copy); a larger batch gets a copy repeated along the batch axis, dropped after use.
        """
        if batch == 1:
            cache = self.cache
        else:
            cache = copy.deepcopy(self.cache)
            cache.batch_repeat_interleave(batch)
        try:
            yield cache
        finally:
            self.peak_bytes = max(self.peak_bytes, kv_bytes(cache) + (self.base_bytes if batch > 1 else 0))
            self.uses += 1
            if batch == 1:
                crop_to(cache, self.length)


def rotary_inv_freqs(llm: CausalLM) -> list[torch.Tensor]:
    """The RoPE inverse frequencies of each decoder layer of ``llm`` (one decoder stack expected)."""
    from streamrank.kernels.decoder import UnsupportedDecoder, layer_ropes

    try:
        ropes = layer_ropes(llm.model)
    except UnsupportedDecoder as exc:
        raise RankerError(f"{llm.name}: this model's positions cannot be re-indexed: {exc}") from exc
    return [rope.inv_freq.detach().float().cpu() for rope in ropes]


def rerotate(keys: torch.Tensor, shift: int, inv_freq: torch.Tensor) -> torch.Tensor:
    """Move RoPE-rotated ``keys`` [batch, heads, tokens, dim] ``shift`` positions back (rotate_half layout)."""
    import torch

    angle = (-float(shift)) * inv_freq.double()
    emb = torch.cat([angle, angle]).to(keys.device)
    cos, sin = emb.cos().to(keys.dtype), emb.sin().to(keys.dtype)
    half = keys.shape[-1] // 2
    rotated = torch.cat([-keys[..., half:], keys[..., :half]], dim=-1)
    return keys * cos + rotated * sin


class SinkCache:
    """StreamingLLM cache: ``sink`` first tokens + ``window`` most recent ones, positions re-indexed.

    Feed a stream chunk by chunk with :meth:`feed`; after each chunk the middle is evicted and the
    kept recent keys re-rotated, so the cache never holds more than ``sink + window`` tokens between
    chunks (``sink + window + chunk`` during one).
    """

    def __init__(self, llm: CausalLM, *, sink: int = 4, window: int = 1020) -> None:
        if sink < 0 or window < 1:
            raise ValueError("sink must be >= 0 and window >= 1")
        self.llm = llm
        self.sink = sink
        self.window = window
        self.cache = llm.new_cache()
        self.inv_freqs: list[torch.Tensor] | None = None  # per layer, read when a dense cache is re-rotated
        self.seen = 0
        self.evicted = 0
        self.peak_bytes = 0

    @property
    def length(self) -> int:
        return cache_length(self.cache)

    @property
    def capacity(self) -> int:
        return self.sink + self.window

    def feed(self, ids: Sequence[int]) -> torch.Tensor:
        """Run ``ids`` after the cached stream; full-vocabulary logits [len(ids), vocab] for them."""
        import torch

        if not ids:
            raise ValueError("feed needs at least one token")
        start = self.length
        if start + len(ids) > self.llm.context_length:
            raise RankerError(f"chunk of {len(ids)} tokens does not fit after a cache of {start}")
        with torch.inference_mode():
            out = self.llm.forward_ids(
                torch.tensor([list(ids)]),
                None,
                torch.arange(start, start + len(ids)).unsqueeze(0),
                self.cache,
                0,
            )
        self.seen += len(ids)
        self.peak_bytes = max(self.peak_bytes, kv_bytes(self.cache))
        self.evict()
        return out.logits[0].float()

    def evict(self) -> None:
        """Keep the sinks and the recent window; re-index the window's positions to follow the sinks."""
        import torch

        total = self.length
        drop = total - self.capacity
        if drop <= 0:
            return
        for layer_idx, layer in enumerate(self.cache.layers):
            if type(layer).__name__ == "RankSpaceLayer":  # positions stored before RoPE: shift them
                index = torch.cat([torch.arange(self.sink), torch.arange(total - self.window, total)])
                positions = layer.positions[:, index.to(layer.positions.device)]
                positions[:, self.sink :] -= drop
                layer.keep(index.to(layer.keys.device), positions)
                continue
            if type(layer).__name__ != "DynamicLayer":
                raise RankerError(
                    f"SinkCache supports plain dynamic cache layers, not {type(layer).__name__}"
                )
            if self.inv_freqs is None:
                self.inv_freqs = rotary_inv_freqs(self.llm)
            keys, values = layer.keys, layer.values
            recent_keys = rerotate(keys[..., total - self.window :, :], drop, self.inv_freqs[layer_idx])
            layer.keys = torch.cat([keys[..., : self.sink, :], recent_keys], dim=-2)
            layer.values = torch.cat(
                [values[..., : self.sink, :], values[..., total - self.window :, :]], dim=-2
            )
        self.evicted += drop
