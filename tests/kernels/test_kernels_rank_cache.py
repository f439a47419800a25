"""Compressed decoders on the fused path (tiny random Llama, Qwen2, Mistral, Qwen3, Gemma 3 built from
configs here): decoder attention over a rank-space KV cache, prefix reuse and the sink cache on it
(logit parity with Hugging Face's eager attention, a full recompute and the dense-cache model), KV
bytes, and the clear error for a decoder the fused path does not support."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import copy  # noqa: E402
from types import SimpleNamespace  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    DynamicCache,
    Gemma2Config,
    Gemma3TextConfig,
    LlamaConfig,
    MistralConfig,
    PhiConfig,
    Qwen2Config,
    Qwen3Config,
)

from streamrank.errors import ConfigError  # noqa: E402
from streamrank.kernels import ops  # noqa: E402
from streamrank.kernels.decoder import (  # noqa: E402
    SUPPORTED_MODEL_TYPES,
    RankSpaceCache,
    RankSpaceLayer,
    UnsupportedDecoder,
    uses_rank_space,
)
from streamrank.kernels.lowrank import apply_lowrank, set_backend  # noqa: E402
from streamrank.kernels.svd import compress_model, target_linears  # noqa: E402
from streamrank.rankers.causal_lm import CausalLM  # noqa: E402
from streamrank.rankers.causal_lm_loading import LowRankOptions, apply_lowrank_options  # noqa: E402
from streamrank.rankers.kv import PrefixCache, SinkCache, kv_bytes  # noqa: E402

torch.set_num_threads(1)

LAYERS = 2
WINDOW = 6
"""Sliding window of the tiny Mistral, Qwen3 (layer 1) and Gemma 3 (layer 0): shorter than the sequences."""
COMMON = {
    "vocab_size": 120,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": LAYERS,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "tie_word_embeddings": True,
}
CONFIGS = {
    # SmolLM2's layout in miniature: GQA, rotary, tied embeddings
    "llama": lambda: LlamaConfig(**COMMON, rope_theta=10000.0),
    "qwen2": lambda: Qwen2Config(**COMMON),  # q/k/v biases
    "mistral": lambda: MistralConfig(**COMMON, sliding_window=WINDOW),
    "qwen3": lambda: Qwen3Config(  # q/k RMSNorm before RoPE; layer 1 slides
        **COMMON, head_dim=16, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1
    ),
    "gemma3": lambda: Gemma3TextConfig(  # (1 + w) norms, its own score scale, local/global RoPE and layers
        **COMMON,
        head_dim=16,
        query_pre_attn_scalar=24,
        sliding_window=WINDOW,
        layer_types=["sliding_attention", "full_attention"],
        final_logit_softcapping=30.0,
    ),
}
ARCHS = list(CONFIGS)
TRITON = pytest.param("triton", marks=pytest.mark.slow)  # the interpreter: 5-10 s a test


def tiny_decoder(arch: str = "llama") -> torch.nn.Module:
    """A dense tiny model of ``arch`` on eager attention; norm weights and biases perturbed so that
    ``w`` vs ``1 + w`` norms and biases matter."""
    torch.manual_seed(0)
    cfg = CONFIGS[arch]()
    cfg._attn_implementation = "eager"
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                param.add_(torch.randn_like(param) * 0.3)
    assert model.config.model_type in SUPPORTED_MODEL_TYPES
    return model


def tiny_llama(ratio: float = 0.5, arch: str = "llama") -> torch.nn.Module:
    """A tiny decoder of ``arch`` compressed at ``ratio``, unfused."""
    return apply_lowrank(tiny_decoder(arch), ratio=ratio, backend="unfused")


def full_rank(model: torch.nn.Module, backend: str) -> torch.nn.Module:
    """``model`` factored at full rank (the same function up to rounding) on ``backend``."""
    ranks = {name: min(m.in_features, m.out_features) for name, m in target_linears(model).items()}
    compress_model(model, ranks=ranks)
    return set_backend(model, backend)


def wrap(model) -> CausalLM:
    tokenizer = SimpleNamespace(
        pad_token_id=0,
        eos_token_id=0,
        unk_token_id=None,
        convert_tokens_to_ids=lambda text: None,
        decode=lambda ids, skip_special_tokens=True: " ".join(map(str, ids)),
    )
    return CausalLM(model, tokenizer, "tiny")


def ids(n: int, seed: int = 0) -> list[int]:
    return torch.randint(1, 120, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def full_logits(model, seq: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=torch.tensor([seq])).logits[0].float()


@pytest.mark.parametrize("backend", ["torch", TRITON])
@pytest.mark.parametrize("arch", ARCHS)
def test_fused_attention_and_ffn_match_the_model_s_own(arch, backend):
    model = tiny_llama(arch=arch)
    batch = torch.randint(1, 120, (2, 14), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 14, dtype=torch.long)
    mask[1, :5] = 0  # left padding
    with torch.inference_mode():
        want = model(input_ids=batch, attention_mask=mask, use_cache=False).logits
        set_backend(model, backend)
        with ops.trace() as calls:
            got = model(input_ids=batch, attention_mask=mask, use_cache=False).logits
            model(input_ids=batch, attention_mask=mask)  # use_cache: a dense cache, the model's attention
    assert type(model.model.layers[0].self_attn).__name__.startswith("LowRank")
    assert (
        calls[("rank_space_attention", backend)] == LAYERS and calls[("lowrank_ffn", backend)] == 2 * LAYERS
    )
    assert calls[("llama_attention", "hf")] == LAYERS  # only the call with a dense transformers cache
    assert calls[("lowrank_linear", backend)] == LAYERS * 5  # o_proj; then q/k/v/o of the fallback
    assert (got[mask.bool()] - want[mask.bool()]).abs().max() <= 1e-4


def test_cache_holds_rank_space_projections():
    model = tiny_llama()
    set_backend(model, "torch")
    llm = wrap(model)
    assert uses_rank_space(model)
    cache = llm.new_cache()
    assert isinstance(cache, RankSpaceCache) and all(isinstance(x, RankSpaceLayer) for x in cache.layers)
    prefix = PrefixCache(llm, ids(20))
    attn = model.model.layers[0].self_attn
    layer = prefix.cache.layers[0]
    assert layer.keys.shape == (1, 20, attn.k_proj.rank) and layer.values.shape == (1, 20, attn.v_proj.rank)
    assert layer.positions.tolist() == [list(range(20))]
    rank_bytes = kv_bytes(prefix.cache)
    set_backend(model, "unfused")
    assert not uses_rank_space(model) and type(llm.new_cache()) is DynamicCache
    dense = PrefixCache(llm, ids(20))
    ranks = attn.k_proj.rank + attn.v_proj.rank
    width = 2 * attn.k_proj.out_features
    assert rank_bytes == LAYERS * 20 * (ranks * 4 + 4)  # float32 projections + an int32 position
    assert kv_bytes(dense.cache) == LAYERS * 20 * width * 4
    with pytest.raises(TypeError, match="rank-space"):
        cache.update(torch.zeros(1, 2, 3, 16), torch.zeros(1, 2, 3, 16), 0)


@pytest.mark.parametrize("backend", ["torch", TRITON])
@pytest.mark.parametrize("arch", ARCHS)
def test_prefix_reuse_equals_full_recompute(arch, backend):
    model = tiny_llama(arch=arch)
    set_backend(model, backend)
    llm = wrap(model)
    prefix_ids, bodies = ids(17), [ids(9, seed=2), ids(13, seed=3)]
    prefix = PrefixCache(llm, prefix_ids)
    base = kv_bytes(prefix.cache)
    for body in (bodies[0], bodies[1], bodies[0]):  # cropped back to the prefix after each use
        with ops.trace() as calls:
            got = llm.logits_at([body], [list(range(len(body)))], prefix=prefix).rows[0]
        assert calls[("llama_attention", "hf")] == 0 and calls[("rank_space_attention", backend)] == LAYERS
        want = full_logits(model, prefix_ids + body)[len(prefix_ids) :]
        assert (got - want).abs().max() <= 1e-4
        assert prefix.cache.get_seq_length() == len(prefix_ids) and kv_bytes(prefix.cache) == base
    # a batch of continuations (right padded; the cache repeated along the batch)
    rows = llm.logits_at(bodies, [[len(b) - 1] for b in bodies], prefix=prefix).rows
    for body, row in zip(bodies, rows, strict=True):
        assert (row[0] - full_logits(model, prefix_ids + body)[-1]).abs().max() <= 1e-4
    assert prefix.peak_bytes > base


@pytest.mark.parametrize("arch", ARCHS)
def test_prefix_reuse_matches_the_dense_cache_model(arch):
    """The same compressed model, HF attention + dense cache vs fused attention + rank-space cache."""
    model = tiny_llama(arch=arch)
    dense_llm = wrap(copy.deepcopy(model))
    set_backend(model, "torch")
    prefix_ids, body = ids(30), ids(11, seed=5)
    dense = dense_llm.logits_at([body], [[len(body) - 1]], prefix=PrefixCache(dense_llm, prefix_ids)).rows[0]
    rank = (
        wrap(model).logits_at([body], [[len(body) - 1]], prefix=PrefixCache(wrap(model), prefix_ids)).rows[0]
    )
    assert (rank - dense).abs().max() <= 1e-4


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_generation_on_the_rank_space_cache(arch):
    model = tiny_llama(arch=arch)
    prompt = ids(8)
    want = wrap(copy.deepcopy(model)).generate_greedy(prompt, 6).token_ids
    set_backend(model, "torch")
    with ops.trace() as calls:
        got = wrap(model).generate_greedy(prompt, 6).token_ids
    assert got == want and calls[("llama_attention", "hf")] == 0


@pytest.mark.parametrize("arch", ARCHS)
def test_sink_cache_on_rank_space_equals_the_rerotated_dense_cache(arch):
    model = tiny_llama(arch=arch)
    dense_llm = wrap(copy.deepcopy(model))
    set_backend(model, "torch")
    llm = wrap(model)
    stream = ids(75, seed=9)
    rank_sink, dense_sink = SinkCache(llm, sink=4, window=24), SinkCache(dense_llm, sink=4, window=24)
    for start in range(0, len(stream), 10):
        chunk = stream[start : start + 10]
        assert (rank_sink.feed(chunk) - dense_sink.feed(chunk)).abs().max() <= 1e-4
        assert rank_sink.length == dense_sink.length <= rank_sink.capacity
    assert isinstance(rank_sink.cache, RankSpaceCache) and rank_sink.evicted == len(stream) - 28
    positions = rank_sink.cache.layers[0].positions
    assert positions.tolist() == [list(range(28))]  # re-indexed: the window follows the sinks
    assert rank_sink.peak_bytes < dense_sink.peak_bytes


def test_unsupported_mask_cannot_use_the_rank_space_cache():
    model = tiny_llama()
    set_backend(model, "torch")
    cache = wrap(model).new_cache()
    odd = torch.zeros(1, 1, 4, 4)  # every query sees every key: not causal
    with pytest.raises(RuntimeError, match="rank-space cache"):
        model.model.layers[0].self_attn(
            torch.randn(1, 4, 64),
            attention_mask=odd,
            cache=cache,
            position_ids=torch.arange(4)[None],
        )


PATHS = ["dense", "unfused", "torch", TRITON]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("arch", ARCHS)
def test_last_position_logits_equal_hugging_face_eager(arch, path):
    """Our path (full-rank factors where compressed) against the dense model on HF eager attention: a
    whole sequence, the same after a cached prefix, and a sink cache evicting past the sliding window
    (reference: the eager model on its re-rotated dense cache)."""
    reference = tiny_decoder(arch)
    model = copy.deepcopy(reference)
    if path != "dense":
        full_rank(model, path)
    llm, eager = wrap(model), wrap(reference)
    seq = ids(20, seed=4)
    want = full_logits(reference, seq)[-1]
    with ops.trace() as calls:
        whole = llm.logits_at([seq], [[len(seq) - 1]]).rows[0][0]
        prefix = PrefixCache(llm, seq[:12])
        reused = llm.logits_at([seq[12:]], [[len(seq) - 13]], prefix=prefix).rows[0][0]
    assert (whole - want).abs().max() <= 1e-4
    assert (reused - want).abs().max() <= 1e-4
    fused = path in ("torch", "triton")
    assert isinstance(prefix.cache, RankSpaceCache) == fused
    if fused:
        assert calls[("llama_attention", "hf")] == 0 and calls[("rank_space_attention", path)] == 3 * LAYERS
    if path == "dense":
        return  # the sink reference is the dense model's own sink cache
    sink, eager_sink = SinkCache(llm, sink=2, window=8), SinkCache(eager, sink=2, window=8)
    stream = ids(26, seed=6)
    for start in range(0, len(stream), 7):
        chunk = stream[start : start + 7]
        assert (sink.feed(chunk)[-1] - eager_sink.feed(chunk)[-1]).abs().max() <= 1e-4
    assert sink.evicted == eager_sink.evicted > 0


def test_unsupported_decoders_raise_naming_the_supported_ones():
    """A compressed decoder the fused path does not cover is an error for a fused backend, never a
    silent fallback to the model's attention; the unfused backend still runs it."""
    small = {k: v for k, v in COMMON.items() if k != "tie_word_embeddings"}
    for cfg in (Gemma2Config(**small, head_dim=16), PhiConfig(**small, partial_rotary_factor=0.5)):
        model = apply_lowrank(AutoModelForCausalLM.from_config(cfg).eval(), ratio=0.5, backend="unfused")
        with pytest.raises(UnsupportedDecoder, match=cfg.model_type) as error:
            set_backend(model, "torch")
        assert all(name in str(error.value) for name in ("llama", "mistral", "qwen2", "qwen3", "gemma3"))
        assert not any(
            type(m).__name__.startswith("LowRank") and hasattr(m, "q_proj") for m in model.modules()
        )
        set_backend(model, "unfused")  # the low-rank model itself is fine
    # from a pipeline's llm settings: a ConfigError with the same message
    with pytest.raises(ConfigError, match="supports model types"):
        apply_lowrank_options(AutoModelForCausalLM.from_config(cfg).eval(), LowRankOptions(backend="torch"))
    # a supported type with a feature the fused path lacks: attention logit soft-capping
    cfg = CONFIGS["gemma3"]()
    cfg.attn_logit_softcapping = 50.0
    model = apply_lowrank(AutoModelForCausalLM.from_config(cfg).eval(), ratio=0.5, backend="unfused")
    with pytest.raises(UnsupportedDecoder, match="soft-capping"):
        set_backend(model, "auto")


def test_bidirectional_gemma3_equals_hugging_face_eager():
    """EmbeddingGemma's layout (Gemma 3, bidirectional, two-sided sliding window) on the fused path."""
    cfg = CONFIGS["gemma3"]()
    cfg.use_bidirectional_attention = True
    torch.manual_seed(0)
    cfg._attn_implementation = "eager"
    reference = AutoModelForCausalLM.from_config(cfg).eval()
    model = full_rank(copy.deepcopy(reference), "torch")
    batch = torch.randint(1, 120, (2, 16), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[1, 11:] = 0  # right padding
    with torch.inference_mode(), ops.trace() as calls:
        want = reference(input_ids=batch, attention_mask=mask, use_cache=False).logits
        got = model(input_ids=batch, attention_mask=mask, use_cache=False).logits
    assert calls[("rank_space_attention", "torch")] == LAYERS and calls[("llama_attention", "hf")] == 0
    assert (got[mask.bool()] - want[mask.bool()]).abs().max() <= 1e-4
