"""Decoder LMs as embedders (last-token pooling) and E2Rank on them, as E2Rank's own code runs it.

:class:`DecoderEmbedder` wraps a Hugging Face decoder (``AutoModel``: Qwen3 for E2Rank-0.6B/4B/8B and
Qwen3-Embedding) and its tokenizer (left padding): each text is tokenized as the tokenizer does by default,
the last position's hidden state is the embedding, L2-normalised. That is vLLM's
``PoolerConfig(pooling_type="LAST", normalize=True)``, which E2Rank's evaluation uses, and the
``last_token_pool`` of its README's transformers example.

:class:`DecoderE2Rank` is the published E2Rank reranking (template ``e2rank``, rankers/templates): the
candidates' first ``doc_max_words`` words; documents embedded with ``<|endoftext|>`` appended; the query
side is the listwise prompt over the top ``num_input_docs`` candidates through the chat template (one user
turn, generation prompt, thinking off); candidates ordered by the dot product of the normalised vectors.
This module is separate from :mod:`streamrank.rankers.e2rank`, whose stage runs sentence-transformers
encoders through this project's truncating prompt.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, ClassVar, Literal

from pydantic import Field

from streamrank.errors import ConfigError
from streamrank.rankers.base import Reranker
from streamrank.rankers.prompts import template_data
from streamrank.stage import StageConfig
from streamrank.types import Ranking


class DecoderEmbedder:
    """A decoder LM used as an embedder: last-token pooling, L2-normalised."""

    def __init__(self, model: Any, tokenizer: Any, name: str, max_length: int = 8192) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.name = name
        self.max_length = max_length

    @classmethod
    def load(cls, name: str, device: str, dtype: str = "float32", max_length: int = 8192) -> DecoderEmbedder:
        """Load ``name`` (hub id or folder; offline: ModelNotFoundError naming ``make models``)."""
        import torch
        from transformers import AutoModel, AutoTokenizer

        from streamrank.models import resolve_model

        source = resolve_model(name)
        try:
            tokenizer = AutoTokenizer.from_pretrained(source, padding_side="left")
            model = AutoModel.from_pretrained(source, dtype=getattr(torch, dtype))
        except OSError as exc:
            raise ConfigError(f"cannot load decoder embedder {name!r}: {exc}") from exc
        return cls(model.to(device).eval(), tokenizer, name, max_length)

    def embed(self, texts: Sequence[str], batch_size: int = 8) -> Any:
        """Normalised last-token embeddings of ``texts``: a float32 tensor [len(texts), dim]."""
        import torch
        import torch.nn.functional as F

        device = next(self.model.parameters()).device
        out = []
        with torch.inference_mode():
            for start in range(0, len(texts), batch_size):
                batch = self.tokenizer(
                    list(texts[start : start + batch_size]),
                    padding=True,
                    truncation=True,
                    max_length=self.max_length,
                    return_tensors="pt",
                ).to(device)
                hidden = self.model(**batch).last_hidden_state
                mask = batch["attention_mask"]
                last = mask.sum(dim=1) - 1 if not bool(mask[:, -1].all()) else None
                pooled = hidden[:, -1] if last is None else hidden[torch.arange(hidden.shape[0]), last]
                out.append(F.normalize(pooled.float(), p=2, dim=1).cpu())
        return torch.cat(out) if out else torch.zeros((0, 0))


class DecoderE2RankConfig(StageConfig):
    model: str = "Alibaba-NLP/E2Rank-0.6B"
    """Hub id or folder of an E2Rank checkpoint (a Qwen3 decoder)."""
    depth: int = Field(100, ge=1)
    """How many of the incoming candidates are reranked (E2Rank's published setting: the BM25 top 100)."""
    template: str = "e2rank"
    num_input_docs: int | None = Field(None, ge=0)
    """Candidates in the listwise prompt; None: the template's (20)."""
    batch_size: int = Field(8, ge=1)
    max_length: int = Field(8192, ge=16)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"


class DecoderE2Rank(Reranker):
    """E2Rank with its own checkpoint: the listwise prompt embedded by the decoder ranks the candidates."""

    Config: ClassVar[type[StageConfig]] = DecoderE2RankConfig
    config: DecoderE2RankConfig
    documents_label: ClassVar[str | None] = "reranker"

    @property
    def recipe(self) -> dict[str, Any]:
        data = template_data(self.config.template)
        if data.get("kind") != "embedding":
            raise ConfigError(f"{self.name}: template {data['name']!r} is not an embedding (E2Rank) template")
        return data

    @property
    def embedder(self) -> DecoderEmbedder:
        cfg = self.config
        from streamrank.models import default_device

        device = self.context.device or default_device()
        key = ("decoder-embedder", cfg.model, cfg.dtype, cfg.max_length, device)
        return self.context.shared(
            key, lambda: DecoderEmbedder.load(cfg.model, device, cfg.dtype, cfg.max_length)
        )

    @property
    def num_input_docs(self) -> int:
        cfg = self.config
        return int(self.recipe["num_input_docs"] if cfg.num_input_docs is None else cfg.num_input_docs)

    def texts(self, query: str, passages: Sequence[str]) -> tuple[str, list[str]]:
        """(the query-side text, the document texts) E2Rank embeds for one query."""
        t, k = self.recipe, self.num_input_docs
        docs = [" ".join(p.split()[: t["doc_max_words"]]) for p in passages]
        lines = "\n".join(
            t["document_line"].format(rank=i, document=d) for i, d in enumerate(docs[:k], start=1)
        )
        messages = [{"role": "user", "content": t["listwise"].format(query=query, documents=lines)}]
        prompt = self.embedder.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True, enable_thinking=False
        )
        return prompt, [d + t["document_suffix"] for d in docs]

    def score_top(self, ranking: Ranking, texts: list[str]) -> list[float]:
        started = time.perf_counter()
        prompt, docs = self.texts(ranking.query.text, texts)
        vectors = self.embedder.embed([prompt, *docs], self.config.batch_size)
        scores = (vectors[1:] @ vectors[0]).tolist()
        tokens = len(self.embedder.tokenizer(prompt)["input_ids"])
        self.record_call(
            ranking,
            self.config.model,
            prompt_tokens=tokens,
            seconds=time.perf_counter() - started,
            note=f"listwise prompt over the top {min(len(texts), self.num_input_docs)}, {len(docs)} documents embedded",
        )
        return scores
