"""Calibration statistics for the activation-aware (whitened) SVD of :mod:`streamrank.kernels.svd`.

:func:`collect_grams` runs the dense model over a few hundred calibration texts with a forward
pre-hook on every target linear layer and returns, per layer name, the Gram matrix
``G = X^T X`` (float64, ``[in, in]``) of that layer's inputs summed over every token that is not
padding. ``compress_model(model, calibration=grams)`` then factors each layer by the whitened SVD.
Names are relative to the module passed in, so collect on the same root (a SentenceTransformer, a
Hugging Face model) that is compressed afterwards.

:func:`load_texts` reads calibration texts from

- ``"auto"``: the first passages of the SciFact corpus (:data:`DEFAULT_SOURCE`), found like every
  dataset through :mod:`streamrank.eval.datasets` (``$STREAMRANK_DATASETS``);
- a dataset name or folder that :func:`streamrank.eval.datasets.load_dataset` knows (``"scifact"``,
  ``"beir/nfcorpus"``, a BEIR folder): its first corpus documents, title and text;
- a ``.jsonl`` file (``contents`` or ``title`` + ``text`` fields) or any other text file (one text a line).

Use passages of the kind the model will see, never the queries a benchmark is scored on.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import partial
from itertools import islice
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .svd import target_linears

DEFAULT_SOURCE = "scifact"
DEFAULT_SIZE = 256
"""Calibration texts used by default (SVD-LLM uses 256 sequences)."""
DEFAULT_MAX_LENGTH = 256
DEFAULT_BATCH_SIZE = 16


class GramCollector:
    """Forward pre-hooks that sum ``X^T X`` over the inputs of linear layers; use as a context manager.

    Set :attr:`mask` (``[batch, seq]`` bool, True for real tokens) before each forward to leave padding
    out; inputs whose leading dims do not match the mask are taken whole. Layers fed the same tensor
    (Q/K/V, gate/up) share one product per forward.
    """

    def __init__(self, model: nn.Module, names: Iterable[str] | None = None) -> None:
        if names is None:
            self.layers: dict[str, nn.Module] = dict(target_linears(model))
        else:
            modules = dict(model.named_modules())
            self.layers = {name: modules[name] for name in names}
        if not self.layers:
            raise ValueError(f"no layers to calibrate in {type(model).__name__}")
        self.grams: dict[str, torch.Tensor] = {}
        self.tokens: dict[str, int] = {}
        self.mask: torch.Tensor | None = None
        self._shared: dict[tuple[Any, ...], tuple[torch.Tensor, torch.Tensor, int]] = {}
        self._handles: list[Any] = []

    def __enter__(self) -> GramCollector:
        for name, layer in self.layers.items():
            self._handles.append(layer.register_forward_pre_hook(partial(self._hook, name)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._shared.clear()

    def run(self, forward: Callable[[], Any], mask: torch.Tensor | None = None) -> None:
        """Call ``forward()`` with ``mask`` as the padding mask of its inputs."""
        self.mask = None if mask is None else mask.bool()
        try:
            forward()
        finally:
            self.mask = None
            self._shared.clear()

    def _hook(self, name: str, module: nn.Module, args: tuple[Any, ...]) -> None:
        x = args[0].detach()
        # The tensor is kept in the cache, so its address cannot be reused by another one meanwhile.
        key = (x.data_ptr(), x.shape, x.stride(), x.dtype, x._version)  # noqa: SLF001 (torch's in-place version counter: no public name)
        hit = self._shared.get(key)
        if hit is None:
            rows = x
            if self.mask is not None and x.dim() >= 3 and x.shape[:2] == self.mask.shape:
                rows = x[self.mask.to(x.device)]
            rows = rows.reshape(-1, x.shape[-1]).float()
            hit = (x, rows.T @ rows, rows.shape[0])
            self._shared[key] = hit
        _, gram, count = hit
        acc = self.grams.get(name)
        if acc is None:
            self.grams[name] = gram.to(torch.float64, copy=True)  # its own accumulator
        else:
            acc.add_(gram)
        self.tokens[name] = self.tokens.get(name, 0) + count


def collect_grams(
    model: nn.Module,
    texts: Sequence[str],
    tokenizer: Any = None,
    *,
    names: Iterable[str] | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_length: int = DEFAULT_MAX_LENGTH,
) -> dict[str, torch.Tensor]:
    """``X^T X`` of the inputs of each target linear layer of ``model`` over ``texts``, by layer name.

    ``model`` is a SentenceTransformer (tokenised by the model itself) or a Hugging Face model
    with ``tokenizer`` (default: the one saved in the local folder the model was loaded from). Texts are cut to ``max_length`` tokens; padding tokens are left out. The model
    runs in eval mode under ``no_grad``; its training flag is restored afterwards.
    """
    texts = [t for t in texts if t and t.strip()]
    if not texts:
        raise ValueError("no calibration texts")
    encode = _encoder(model, tokenizer, max_length)
    device = _device(model)
    order = sorted(texts, key=len)  # similar lengths per batch: less padding to compute
    was_training = model.training
    model.eval()
    try:
        with GramCollector(model, names) as collector, torch.no_grad():
            for start in range(0, len(order), batch_size):
                inputs, forward = encode(order[start : start + batch_size], device)
                collector.run(forward, inputs.get("attention_mask"))
    finally:
        model.train(was_training)
    return collector.grams


def _device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


Encoder = Callable[[list[str], torch.device], tuple[Mapping[str, torch.Tensor], Callable[[], Any]]]


def _encoder(model: nn.Module, tokenizer: Any, max_length: int) -> Encoder:
    """A function turning a batch of texts into (inputs, a call running ``model`` on them)."""
    # SentenceTransformer: ``preprocess`` since sentence-transformers 6, ``tokenize`` before.
    preprocess = getattr(model, "preprocess", None) or getattr(model, "tokenize", None)
    if tokenizer is None and callable(preprocess):

        def encode_st(batch: list[str], device: torch.device) -> tuple[dict[str, Any], Callable[[], Any]]:
            features = dict(preprocess(batch))
            for key, value in features.items():
                if isinstance(value, torch.Tensor):
                    features[key] = (value[:, :max_length] if value.dim() == 2 else value).to(device)
            return features, lambda: model(features)

        return encode_st
    tokenizer = tokenizer if tokenizer is not None else _local_tokenizer(model)
    if tokenizer is None:
        raise ValueError(
            f"calibrating a {type(model).__name__} needs its tokenizer (pass tokenizer=...), "
            "or pass the Gram matrices directly"
        )
    params = inspect.signature(model.forward).parameters
    extra: dict[str, Any] = {}
    if "logits_to_keep" in params:  # a causal LM: do not build [tokens, vocab] logits for nothing
        extra["logits_to_keep"] = 1
    if "use_cache" in params:
        extra["use_cache"] = False

    def encode_hf(batch: list[str], device: torch.device) -> tuple[dict[str, Any], Callable[[], Any]]:
        pad, side = tokenizer.pad_token, getattr(tokenizer, "padding_side", "right")
        try:
            if pad is None:  # Llama-style tokenizers: pad with EOS, those positions are masked out anyway
                tokenizer.pad_token = tokenizer.eos_token
            tokenizer.padding_side = "right"  # positions of real tokens as without padding
            enc = tokenizer(batch, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        finally:
            if pad is None:
                tokenizer.pad_token = None
            tokenizer.padding_side = side
        inputs = {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
        return inputs, lambda: model(**inputs, **extra)

    return encode_hf


def _local_tokenizer(model: nn.Module) -> Any:
    """The tokenizer saved next to a Hugging Face model loaded from a local folder, else None."""
    config = getattr(model, "config", None)
    name = getattr(model, "name_or_path", None) or getattr(config, "_name_or_path", None)
    if not name or not Path(name).is_dir():
        return None
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError):
        return None


def load_texts(source: str | Path = "auto", limit: int = DEFAULT_SIZE) -> list[str]:
    """Up to ``limit`` calibration texts from ``source`` (see the module notes), in file order."""
    if limit < 1:
        raise ValueError(f"calibration size must be >= 1, got {limit}")
    if str(source) == "auto":
        source = DEFAULT_SOURCE
    path = Path(source)
    if path.is_file():
        with path.open(encoding="utf-8") as fh:
            lines = (line.strip() for line in fh)
            if path.suffix == ".jsonl":
                texts = [_row_text(json.loads(line)) for line in islice((x for x in lines if x), limit)]
            else:
                texts = list(islice((x for x in lines if x), limit))
    else:
        from streamrank.datasets import load_dataset

        texts = [doc.contents for doc in islice(load_dataset(str(source)).corpus(), limit)]
    texts = [t for t in texts if t]
    if not texts:
        raise ValueError(f"no calibration texts in {source}")
    return texts


def _row_text(row: Mapping[str, Any]) -> str:
    if row.get("contents"):
        return str(row["contents"])
    title, text = str(row.get("title") or ""), str(row.get("text") or "")
    return f"{title} {text}".strip()
