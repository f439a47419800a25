"""A compressed Llama on the fused path: decoder attention over a rank-space KV cache, prefix reuse and
the sink cache on it (logit parity with a full recompute and with the dense-cache model), KV bytes."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import copy  # noqa: E402
from types import SimpleNamespace  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM  # noqa: E402

from streamrank.kernels import ops  # noqa: E402
from streamrank.kernels.decoder import RankSpaceCache, RankSpaceLayer, uses_rank_space  # noqa: E402
from streamrank.kernels.lowrank import apply_lowrank, set_backend  # noqa: E402
from streamrank.rankers.causal_lm import CausalLM  # noqa: E402
from streamrank.rankers.kv import PrefixCache, SinkCache, kv_bytes  # noqa: E402

torch.set_num_threads(1)

LAYERS = 2


def tiny_llama(ratio: float = 0.5, heads: int = 4, kv_heads: int = 2) -> LlamaForCausalLM:
    """SmolLM2's layout in miniature: GQA, rotary, tied embeddings; compressed, unfused."""
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=120,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=LAYERS,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=256,
        rope_theta=10000.0,
        tie_word_embeddings=True,
    )
    return apply_lowrank(LlamaForCausalLM(cfg).eval(), ratio=ratio, backend="unfused")


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


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fused_attention_and_ffn_match_the_model_s_own(backend):
    model = tiny_llama()
    batch = torch.randint(1, 120, (2, 14), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 14, dtype=torch.long)
    mask[1, :5] = 0  # left padding
    with torch.inference_mode():
        want = model(input_ids=batch, attention_mask=mask, use_cache=False).logits
        set_backend(model, backend)
        with ops.trace() as calls:
            got = model(input_ids=batch, attention_mask=mask, use_cache=False).logits
            model(input_ids=batch, attention_mask=mask)  # use_cache: a dense cache, the model's attention
    assert type(model.model.layers[0].self_attn).__name__ == "LowRankLlamaAttention"
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


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_prefix_reuse_equals_full_recompute(backend):
    model = tiny_llama()
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


def test_prefix_reuse_matches_the_dense_cache_model():
    """The same compressed model, HF attention + dense cache vs fused attention + rank-space cache."""
    model = tiny_llama()
    dense_llm = wrap(copy.deepcopy(model))
    set_backend(model, "torch")
    prefix_ids, body = ids(30), ids(11, seed=5)
    dense = dense_llm.logits_at([body], [[len(body) - 1]], prefix=PrefixCache(dense_llm, prefix_ids)).rows[0]
    rank = (
        wrap(model).logits_at([body], [[len(body) - 1]], prefix=PrefixCache(wrap(model), prefix_ids)).rows[0]
    )
    assert (rank - dense).abs().max() <= 1e-4


def test_greedy_generation_on_the_rank_space_cache():
    model = tiny_llama()
    prompt = ids(8)
    want = wrap(copy.deepcopy(model)).generate_greedy(prompt, 6).token_ids
    set_backend(model, "torch")
    with ops.trace() as calls:
        got = wrap(model).generate_greedy(prompt, 6).token_ids
    assert got == want and calls[("llama_attention", "hf")] == 0


def test_sink_cache_on_rank_space_equals_the_rerotated_dense_cache():
    model = tiny_llama()
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
