"""Swap a Hugging Face BERT or decoder (Llama family) model onto low-rank layers and fused low-rank kernels, in place.

:func:`apply_lowrank` first SVD-compresses the projections (:mod:`streamrank.kernels.svd`; plain SVD,
or the activation-aware whitened SVD with calibration data from :mod:`streamrank.kernels.calibrate`), then
patches the modules so their forward runs the chosen backend:

- every :class:`~streamrank.kernels.svd.LowRankLinear` runs the fused low-rank linear kernel
  (Triton) or the two-GEMM torch product;
- BERT layers: the FFN (``intermediate.dense`` + activation + ``output.dense``) runs as one fused
  low-rank FFN, followed by the layer's own dropout, residual and LayerNorm; the self-attention
  module computes its context with the fused low-rank attention (Q/K/V rebuilt in tiles, online
  softmax), then ``attention.output`` applies its dense/dropout/residual/LayerNorm as before;
- decoder layers (Llama, Mistral, Qwen2, Qwen3, Gemma 3): the gated MLP runs as one fused low-rank FFN;
  the attention (:class:`streamrank.kernels.decoder.FusedLlamaAttention`) runs the fused decoder
  attention over rank-space Q/K/V with the q/k norms, RoPE and sliding window applied to the rebuilt
  tiles, and reads/writes a rank-space KV cache (:class:`streamrank.kernels.decoder.RankSpaceCache`:
  ``x V_k^T`` and ``x V_v^T`` per token). With a dense transformers cache (``generate()`` without one
  of ours) it falls back to the model's attention. A compressed decoder of another type raises
  :class:`streamrank.kernels.decoder.UnsupportedDecoder` (a ValueError) for a fused backend.

Patching swaps the module's class for a subclass that overrides one method (``forward`` or
``feed_forward_chunk``), so parameter names, ``isinstance`` checks and ``state_dict`` stay as in the
compressed model. Cases a fused path does not cover (KV cache, cross-attention, attention dropout in
training, attention masks other than key padding with or without causality) fall back to the
original forward. Backend ``"unfused"`` restores the original classes.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import decoder, ops
from .calibrate import DEFAULT_SIZE, collect_grams, load_texts
from .reference import key_mask_from_hf
from .svd import DAMPING, METHODS, RANKS_FILE, LowRankLinear, compress_model, load_compressed, lowrank_layers

log = logging.getLogger(__name__)

# Hugging Face ``hidden_act`` names -> activation names of the kernels.
HF_ACTIVATIONS = {
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "silu": "silu",
    "swish": "silu",
    "relu": "relu",
}


@dataclass(frozen=True)
class LowRankSettings:
    """Low-rank settings of a stage config, e.g. ``lowrank = {ratio = 0.5, backend = "auto"}``.

    ``energy``, when given, chooses the rank of each layer and ``ratio`` is ignored.
    ``method`` is ``"svd"`` (plain truncated SVD) or ``"whitened"`` (activation-aware SVD, SVD-LLM);
    left out it is ``"whitened"`` when ``calibration`` is set, else ``"svd"``. ``calibration`` names the
    calibration texts (:func:`streamrank.kernels.calibrate.load_texts`: ``"auto"`` for SciFact passages,
    a dataset name, or a file), of which the first ``calibration_size`` are used, e.g.
    ``lowrank = {ratio = 0.6, calibration = "auto"}``.

    ``factors`` names a folder of stored factors (``streamrank compress --output DIR``, or
    :func:`streamrank.kernels.svd.save_compressed`): they are loaded onto the dense model as they are
    (no decomposition, no calibration; the other settings but ``backend`` are ignored), e.g.
    ``lowrank = {factors = "models/minilm-60-healed"}``.
    """

    ratio: float | None = 0.5
    energy: float | None = None
    backend: str = "auto"
    method: str | None = None
    calibration: str | None = None
    calibration_size: int = DEFAULT_SIZE
    factors: str | None = None

    def __post_init__(self) -> None:
        ops.check_backend(self.backend)
        if self.factors is not None:
            if not (Path(self.factors).expanduser() / RANKS_FILE).is_file():
                raise ValueError(
                    f"lowrank factors: {self.factors!r} has no {RANKS_FILE} (streamrank compress writes one)"
                )
            object.__setattr__(self, "method", self.method or "svd")
            return
        if self.ratio is None and self.energy is None:
            raise ValueError("lowrank needs ratio or energy")
        if self.ratio is not None and not 0 < self.ratio:
            raise ValueError(f"lowrank ratio must be > 0, got {self.ratio}")
        if self.energy is not None and not 0 < self.energy <= 1:
            raise ValueError(f"lowrank energy must be in (0, 1], got {self.energy}")
        method = _resolve_method(self.method, self.calibration is not None)
        object.__setattr__(self, "method", method)  # frozen: store the resolved method
        if method == "svd" and self.calibration is not None:
            raise ValueError("lowrank calibration is only used by method 'whitened'")
        if self.calibration_size < 1:
            raise ValueError(f"lowrank calibration_size must be >= 1, got {self.calibration_size}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LowRankSettings:
        """Build from a config table; unknown keys raise ``ValueError``. ``{energy = x}`` alone means no ratio."""
        known = {f.name for f in fields(cls)}
        for key in data:
            if key not in known:
                raise ValueError(f"unknown lowrank setting {key!r}; expected {', '.join(sorted(known))}")
        values = dict(data)
        if values.get("energy") is not None and "ratio" not in values:
            values["ratio"] = None
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def apply(self, model: nn.Module, tokenizer: Any = None, texts: Sequence[str] | None = None) -> nn.Module:
        """``apply_lowrank`` with these settings.

        For ``"whitened"`` the calibration texts are ``texts`` if given, else read from ``calibration``;
        ``tokenizer`` is needed unless ``model`` is a SentenceTransformer. A model that is already
        compressed only switches backend (nothing is read). With ``factors`` the stored factors are
        loaded instead (names relative to ``model``: save and load the same kind of root).
        """
        if self.factors is not None:
            if not lowrank_layers(model):
                load_compressed(model, Path(self.factors).expanduser())
            return set_backend(model, self.backend)
        if self.method == "whitened" and texts is None and not lowrank_layers(model):
            if self.calibration is None:
                raise ValueError("lowrank method 'whitened' needs calibration texts: set calibration")
            texts = load_texts(self.calibration, self.calibration_size)
        return apply_lowrank(
            model,
            ratio=self.ratio,
            energy=self.energy,
            backend=self.backend,
            method=self.method,
            calibration_texts=texts,
            tokenizer=tokenizer,
        )


def _resolve_method(method: str | None, calibrated: bool) -> str:
    if method is None:
        return "whitened" if calibrated else "svd"
    if method not in METHODS:
        raise ValueError(f"unknown lowrank method {method!r}; expected one of {', '.join(METHODS)}")
    return method


def apply_lowrank(
    model: nn.Module,
    ratio: float | None = 0.5,
    energy: float | None = None,
    backend: str = "auto",
    *,
    method: str | None = None,
    calibration_texts: Sequence[str] | None = None,
    grams: Mapping[str, torch.Tensor] | None = None,
    tokenizer: Any = None,
    damping: float = DAMPING,
) -> nn.Module:
    """Compress ``model``'s projections (unless already compressed) and patch it for ``backend``; return it.

    ``model`` may be a Hugging Face BERT or decoder model (:mod:`streamrank.kernels.decoder`) or anything containing one (a
    SentenceTransformer, a ``LlamaForCausalLM``). Calling it again on a compressed model only switches
    the backend (``"auto" | "triton" | "torch" | "unfused"``).

    ``method="whitened"`` (the default when ``calibration_texts`` or ``grams`` are given) factors each
    layer by the activation-aware SVD: the Gram matrices of the layer inputs are ``grams`` if given,
    else collected by running the dense model over ``calibration_texts`` (with ``tokenizer``, which a
    SentenceTransformer does not need).
    """
    calibrated = calibration_texts is not None or grams is not None
    method = _resolve_method(method, calibrated)
    LowRankSettings(ratio, energy, backend, method)  # validates
    if method == "svd" and calibrated:
        raise ValueError("calibration data is only used by method 'whitened'")
    if method == "whitened" and not calibrated:
        raise ValueError("method 'whitened' needs calibration_texts or grams")
    if not lowrank_layers(model):
        if method == "whitened" and grams is None:
            grams = collect_grams(model, calibration_texts or [], tokenizer)
        compress_model(
            model,
            ratio=None if energy is not None else ratio,
            energy=energy,
            calibration=grams if method == "whitened" else None,
            damping=damping,
        )
    set_backend(model, backend)
    return model


def set_backend(model: nn.Module, backend: str) -> nn.Module:
    """Point every low-rank layer and patched block of a compressed model at ``backend``."""
    ops.check_backend(backend)
    for layer in lowrank_layers(model).values():
        layer.backend = backend
    for module in list(model.modules()):
        if _is_bert_layer(module):
            _patch(module.attention.self, _FusedBertSelfAttention, backend)
            act = _activation(module.attention.self.config, module)
            _patch(module, _FusedBertLayer, backend if act else "unfused", lowrank_activation=act)
        elif _is_gated_mlp(module):
            act = _activation(module.config, module)
            _patch(module, _FusedGatedMLP, backend if act else "unfused", lowrank_activation=act)
    if backend == "unfused":
        for module in list(model.modules()):
            if isinstance(module, decoder.FusedLlamaAttention):
                _patch(module, decoder.FusedLlamaAttention, backend)
        return model
    for attn, rotary in decoder.fused_layers(model):  # raises UnsupportedDecoder for other decoders
        _patch(attn, decoder.FusedLlamaAttention, backend, lowrank_rope=(rotary,))
    return model


def _activation(config: Any, module: nn.Module) -> str | None:
    """Kernel activation name for a model's ``hidden_act`` (Gemma: ``hidden_activation``); None (FFN
    stays unfused) if unsupported."""
    act = HF_ACTIVATIONS.get(
        getattr(config, "hidden_act", None) or getattr(config, "hidden_activation", None)
    )
    if act is None:
        log.warning("%s: hidden_act not supported by the fused FFN, it stays unfused", type(module).__name__)
    return act


def _lowrank(*modules: Any) -> bool:
    return all(isinstance(m, LowRankLinear) for m in modules)


def _is_bert_layer(m: nn.Module) -> bool:
    attn = getattr(getattr(m, "attention", None), "self", None)
    inter, out = getattr(m, "intermediate", None), getattr(m, "output", None)
    return (
        attn is not None
        and inter is not None
        and out is not None
        and not getattr(m.attention, "is_cross_attention", False)
        and _lowrank(attn.query, attn.key, attn.value, inter.dense, out.dense)
    )


def _is_gated_mlp(m: nn.Module) -> bool:
    parts = [getattr(m, name, None) for name in ("gate_proj", "up_proj", "down_proj")]
    return hasattr(m, "config") and _lowrank(*parts)


# ---------------------------------------------------------------------------------------------
# Class swapping
# ---------------------------------------------------------------------------------------------

_PATCHED: dict[tuple[type, type], type] = {}


def _patch(module: nn.Module, mixin: type, backend: str, **attrs: Any) -> None:
    """Give ``module`` the class ``mixin + original class`` and set ``attrs`` on it.

    For backend ``"unfused"`` the original class is restored instead.
    """
    base = getattr(type(module), "_lowrank_base", type(module))
    if backend == "unfused":
        module.__class__ = base
        return
    cls = _PATCHED.get((mixin, base))
    if cls is None:
        name = f"LowRank{base.__name__}"
        while name in globals():
            name += "_"
        cls = type(name, (mixin, base), {"__module__": __name__, "__qualname__": name, "_lowrank_base": base})
        globals()[name] = cls  # so patched models stay picklable
        _PATCHED[(mixin, base)] = cls
    module.__class__ = cls
    module.lowrank_backend = backend
    for key, value in attrs.items():
        setattr(module, key, value)


class _FusedBertSelfAttention(nn.Module):
    """Self-attention context from the fused low-rank attention; returns ``(context, None)``."""

    lowrank_backend = "auto"

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: Any = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        backend = ops.resolve_backend(self.lowrank_backend, hidden_states.device)
        ok, key_mask = key_mask_from_hf(attention_mask, self.is_causal)
        unsupported = (
            not ok
            or cache is not None
            or kwargs.get("encoder_hidden_states") is not None
            or (self.training and self.dropout.p > 0)
        )
        if backend == "unfused" or unsupported:
            return super().forward(hidden_states, attention_mask=attention_mask, cache=cache, **kwargs)
        context = ops.lowrank_attention(
            hidden_states,
            self.query.factors(),
            self.key.factors(),
            self.value.factors(),
            self.num_attention_heads,
            key_mask=key_mask,
            causal=self.is_causal,
            scale=self.scaling,
            backend=backend,
        )
        return context, None


class _FusedBertLayer(nn.Module):
    """BERT layer whose FFN is one fused low-rank FFN, then dropout, residual and LayerNorm as in BertOutput."""

    lowrank_backend = "auto"
    lowrank_activation = "gelu"

    def feed_forward_chunk(self, attention_output: torch.Tensor) -> torch.Tensor:
        backend = ops.resolve_backend(self.lowrank_backend, attention_output.device)
        if backend == "unfused":
            return super().feed_forward_chunk(attention_output)
        h = ops.lowrank_ffn(
            attention_output,
            self.intermediate.dense.factors(),
            self.output.dense.factors(),
            self.lowrank_activation,
            backend=backend,
        )
        return self.output.LayerNorm(self.output.dropout(h) + attention_output)


class _FusedGatedMLP(nn.Module):
    """Llama MLP ``down(act(gate(x)) * up(x))`` as one fused low-rank FFN."""

    lowrank_backend = "auto"
    lowrank_activation = "silu"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        backend = ops.resolve_backend(self.lowrank_backend, x.device)
        if backend == "unfused":
            return super().forward(x)
        return ops.lowrank_ffn(
            x,
            self.up_proj.factors(),
            self.down_proj.factors(),
            self.lowrank_activation,
            gate=self.gate_proj.factors(),
            backend=backend,
        )
