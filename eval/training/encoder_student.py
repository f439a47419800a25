"""The E2Rank recipe: fine-tune the sentence encoder of an ``e2rank`` stage.

For a batch of examples the copied encoder embeds, with gradients: each query, each example's
pseudo-query (the stage's own E2Rank prompt over the first stage's top passages,
:meth:`~streamrank.rankers.e2rank.EmbeddingListwise.pseudo_query`) and each example's candidates (its
first ``list_size`` passages in target order: the relevant ones, then the teacher's best others).
The loss is the in-batch contrastive loss of query -> its best candidate against every candidate of
the batch, plus the weighted RankNet of the pseudo-query's cosines to its candidates against their
target order. :meth:`EncoderStudent.save` writes a sentence-transformers folder (``model = "DIR"``).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from streamrank.eval.training.examples import Example
from streamrank.eval.training.losses import CONTRASTIVE_SCALE, in_batch_contrastive, weighted_ranknet
from streamrank.rankers.e2rank import EmbeddingListwise

if TYPE_CHECKING:
    import torch


class EncoderStudent:
    """A trainable copy of the stage's encoder (every weight) and the E2Rank losses."""

    def __init__(
        self, stage: EmbeddingListwise, texts: Mapping[str, str], *, list_size: int = 8, seed: int = 0
    ) -> None:
        import torch

        torch.manual_seed(seed)
        self.stage = stage
        self.base_model = stage.config.model
        self.texts = texts
        self.list_size = list_size
        self.query_prompt = stage.encoding.prompt("query")
        self.document_prompt = stage.encoding.prompt("document")
        self.model = copy.deepcopy(stage.encoder)
        self.model.requires_grad_(True)
        self.model.train()
        self.device = next(self.model.parameters()).device
        self._pseudo: dict[str, str] = {}
        count = sum(p.numel() for p in self.model.parameters())
        self.description = f"the whole encoder ({count:,} parameters)"

    def trainable(self) -> dict[str, torch.nn.Parameter]:
        return {name: p for name, p in self.model.named_parameters() if p.requires_grad}

    def pseudo_query(self, example: Example) -> str:
        """The stage's E2Rank prompt over the example's pool in first-stage order (cached)."""
        if example.query_id not in self._pseudo:
            passages = [self.texts[d] for d in example.doc_ids]
            self._pseudo[example.query_id] = self.stage.pseudo_query(example.query, passages).text
        return self._pseudo[example.query_id]

    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        """Unit embeddings of ``texts`` with gradients."""
        import torch.nn.functional as F

        prepare = getattr(self.model, "preprocess", None) or self.model.tokenize
        features = prepare(list(texts))
        features = {k: v.to(self.device) if hasattr(v, "to") else v for k, v in features.items()}
        return F.normalize(self.model(features)["sentence_embedding"], dim=-1)

    def loss(
        self, batch: Sequence[Example], rng: np.random.Generator
    ) -> tuple[torch.Tensor, dict[str, float]]:
        import torch

        lists = [list(e.target[: self.list_size]) for e in batch]
        candidates = [
            self.document_prompt + self.texts[e.doc_ids[i]]
            for e, ids in zip(batch, lists, strict=True)
            for i in ids
        ]
        docs = self.embed(candidates)
        queries = self.embed([self.query_prompt + e.query for e in batch])
        pseudo = self.embed([self.query_prompt + self.pseudo_query(e) for e in batch])
        starts = np.cumsum([0, *[len(ids) for ids in lists]])
        contrastive = in_batch_contrastive(queries, docs, torch.tensor(starts[:-1], dtype=torch.long))
        listwise = torch.stack(
            [
                weighted_ranknet(
                    CONTRASTIVE_SCALE * docs[starts[b] : starts[b + 1]] @ pseudo[b], torch.arange(len(ids))
                )
                for b, ids in enumerate(lists)
            ]
        ).mean()
        loss = contrastive + listwise
        return loss, {"contrastive": float(contrastive.detach()), "listwise": float(listwise.detach())}

    def save(self, folder: Path) -> None:
        """A sentence-transformers folder (``model.save``)."""
        self.model.eval()
        folder.mkdir(parents=True, exist_ok=True)
        self.model.save(str(folder))
