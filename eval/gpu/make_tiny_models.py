"""Tiny randomly initialised stand-ins for the published checkpoints, saved by hub id under DEST.

    python eval/gpu/make_tiny_models.py DEST

Each folder has the architecture of the checkpoint it stands in for (Mistral for FirstMistral and RankZephyr,
Qwen3 for E2Rank and Qwen3-Reranker, BERT with one logit for the MiniLM cross-encoder) at hidden size 16, and
the packaged SmolLM2-135M-Instruct tokenizer (ChatML, offline). With STREAMRANK_MODELS=DEST the published
configs load them instead of the hub: ``eval/gpu/reproduce.sh`` does this for its CPU smoke run. They rank at
random; they exercise loading, prompts, scoring and the report, not quality.
"""

from __future__ import annotations

import sys
from pathlib import Path


def main(dest: Path) -> None:
    import torch
    from transformers import (
        AutoTokenizer,
        BertConfig,
        BertForSequenceClassification,
        MistralConfig,
        MistralForCausalLM,
        Qwen3Config,
        Qwen3ForCausalLM,
    )

    from streamrank.models import smollm2_gguf_path
    from streamrank.rankers.causal_lm_loading import unpacked_gguf

    tokenizer = AutoTokenizer.from_pretrained(str(unpacked_gguf(smollm2_gguf_path())))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    vocab = len(tokenizer)
    small = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2}
    decoder = {**small, "num_key_value_heads": 1, "max_position_embeddings": 8192, "vocab_size": vocab}
    models = {
        "castorini/first_mistral": lambda: MistralForCausalLM(MistralConfig(**decoder)),
        "castorini/rank_zephyr_7b_v1_full": lambda: MistralForCausalLM(MistralConfig(**decoder)),
        "Qwen/Qwen3-Reranker-0.6B": lambda: Qwen3ForCausalLM(Qwen3Config(**decoder, head_dim=8)),
        "Alibaba-NLP/E2Rank-0.6B": lambda: Qwen3ForCausalLM(Qwen3Config(**decoder, head_dim=8)),
        "cross-encoder/ms-marco-MiniLM-L6-v2": lambda: BertForSequenceClassification(
            BertConfig(**small, vocab_size=vocab, max_position_embeddings=512, num_labels=1)
        ),
    }
    for seed, (hub_id, make) in enumerate(models.items()):
        folder = dest / hub_id
        if (folder / "config.json").exists():
            continue
        torch.manual_seed(seed)
        make().eval().save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        print(f"tiny stand-in for {hub_id}: {folder}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(Path(sys.argv[1]))
