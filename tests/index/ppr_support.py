"""A toy corpus of three topics and a PPR stage over it, with a bag-of-words stand-in for the dense stage."""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np

from streamrank.context import PipelineContext
from streamrank.index.ppr import PPRStage
from streamrank.types import Document

TOPICS = {
    "a": "cell membrane protein receptor signalling",
    "b": "galaxy star orbit telescope redshift",
    "c": "vaccine antibody immune infection trial",
}


def embed(text: str, dim: int = 64) -> np.ndarray:
    """A deterministic bag-of-words embedding (hashed words), L2-normalised."""
    vec = np.zeros(dim, dtype=np.float32)
    for word in text.lower().split():
        vec[zlib.crc32(word.encode()) % dim] += 1.0
    return vec / max(np.linalg.norm(vec), 1e-9)


class FakeDense:
    """Stands in for the dense stage: the PPR stage needs ``folder``, ``settings`` and the VectorSource
    protocol (``name``, ``vector_settings``, ``embeddings_for``)."""

    name = "dense"

    def __init__(self, context: PipelineContext) -> None:
        self.context = context
        self.folder = Path(context.index_dir) / "dense"

    def vector_settings(self) -> dict[str, str]:
        return {"model": "fake-bag-of-words"}

    def settings(self) -> dict[str, str]:
        return {"kind": "dense", "model": "fake-bag-of-words"}

    def embeddings_for(self, doc_ids: list[str]) -> np.ndarray:
        docs = self.context.store.get_many(doc_ids)
        return np.stack([embed(docs[d].contents) for d in doc_ids])


def corpus(per_topic: int = 8) -> list[Document]:
    docs = []
    for topic, words in TOPICS.items():
        vocab = words.split()
        for i in range(per_topic):
            text = " ".join(vocab[j % len(vocab)] for j in range(i, i + 3)) + f" {topic}{i}"
            docs.append(Document(id=f"{topic}{i}", text=text))
    return docs


def ppr_stage(context: PipelineContext, **options) -> PPRStage:
    """A ppr stage over ``context`` with the bag-of-words dense stage bound as its ``vectors_from``."""
    stage = PPRStage.from_dict({"kind": "ppr", **options}, context)
    stage.bind("vectors_from", FakeDense(context))
    return stage  # type: ignore[return-value]


def make_stage(tmp_path: Path, **options) -> PPRStage:
    context = PipelineContext(tmp_path / "idx", corpus="toy")
    stage = ppr_stage(context, neighbors=3, **options)
    context.store.upsert(corpus())
    stage.build(context.store)
    return stage  # type: ignore[return-value]
