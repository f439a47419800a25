"""Tiny randomly initialised models over real tokenizers, for parity tests that need a forward pass."""

from __future__ import annotations

import functools
from typing import Any

import pytest


@functools.cache
def smollm2_tokenizer_folder() -> str:
    """The packaged SmolLM2-135M-Instruct, unpacked once (its tokenizer has ChatML and "yes"/"no" tokens)."""
    from streamrank.models import smollm2_gguf_path
    from streamrank.rankers.causal_lm_loading import unpacked_gguf

    try:
        return str(unpacked_gguf(smollm2_gguf_path()))
    except FileNotFoundError as exc:
        pytest.skip(str(exc))


def tokenizer(**kwargs: Any) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_tokenizer_folder(), **kwargs)


def qwen3_config(vocab_size: int) -> Any:
    """A 1-layer Qwen3 (E2Rank's and Qwen3-Reranker's architecture), hidden size 16."""
    from transformers import Qwen3Config

    return Qwen3Config(
        vocab_size=vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=8192,
        tie_word_embeddings=False,
    )  # fmt: skip
