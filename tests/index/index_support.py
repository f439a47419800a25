"""Helpers of the index tests on the first 300 SciFact docs (fixtures are in conftest.py).

Real components throughout: one Lucene index and one FAISS index are built per session (MiniLM
loaded once); tests that change an index work on a copy of that folder.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from streamrank.context import PipelineContext
from streamrank.index.bm25 import BM25Retriever
from streamrank.index.dense import DenseRetriever
from streamrank.models import MINILM
from streamrank.stage import BaseStage
from streamrank.types import Document, Query, Ranking

torch.set_num_threads(1)

N_DOCS = 300
PROBES = range(0, N_DOCS, 15)  # 20 documents whose titles serve as queries
NEW_DOC = Document(
    id="zz-new",
    title="Axolotl limb regeneration under microgravity",
    text="We report axolotl limb regeneration aboard the orbital station under microgravity.",
)


def context_for(index_dir: Path, model: Any) -> PipelineContext:
    """A context whose MiniLM is the session's already loaded one."""
    ctx = PipelineContext(index_dir, device="cpu")
    ctx.shared(("sentence-encoder", MINILM), lambda: model)
    return ctx


class EncodeCounter:
    """Counts the documents DenseRetriever encodes (installed over encode_documents)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.docs = 0
        original = DenseRetriever.encode_documents

        def counting(stage: DenseRetriever, documents: Sequence[Document]) -> np.ndarray:
            self.docs += len(documents)
            return original(stage, documents)

        monkeypatch.setattr(DenseRetriever, "encode_documents", counting)


def bm25(ctx: PipelineContext, **options: Any) -> BM25Retriever:
    return BM25Retriever.from_dict({"kind": "bm25", **options}, ctx)  # type: ignore[return-value]


def dense(ctx: PipelineContext, **options: Any) -> DenseRetriever:
    return DenseRetriever.from_dict({"kind": "dense", **options}, ctx)  # type: ignore[return-value]


def search(stage: BaseStage, *texts: str) -> list[Ranking]:
    return stage.run([Ranking(query=Query(id=f"q{i}", text=t)) for i, t in enumerate(texts)])


def write_pipeline(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "pipeline.toml"
    path.write_text('name = "t"\n' + body)
    return path


HYBRID = """
[[stages]]
kind = "fusion"
k = 50
  [[stages.retrievers]]
  kind = "bm25"
  k = 50
  [[stages.retrievers]]
  kind = "dense"
  k = 50
"""
