"""Scoring a supplied candidate pool with the dense stage (``dense.toml`` reranking DL19's BM25 top-100)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from streamrank.types import ModelCall, Ranking

if TYPE_CHECKING:
    import numpy as np

    from streamrank.index.dense import DenseRetriever


def score_supplied_pool(stage: DenseRetriever, rankings: Sequence[Ranking], prepared: np.ndarray) -> list[list[float]]:
    """Cosine of each supplied candidate with its query.

    A candidate's text is its ``document.contents`` (encoded, identical texts once per batch);
    without a document, the stored embedding of its id, else the store's text. A candidate
    with no text anywhere scores -1 (the lowest cosine) and the ranking gets a note.
    """
    import numpy as np

    without_text = list(dict.fromkeys(c.doc_id for r in rankings for c in r.candidates if c.document is None))
    vectors = stage.stored_vectors(without_text)  # doc id -> stored embedding
    need_text = [i for i in without_text if i not in vectors]
    stored = stage.context.store.get_many(need_text) if need_text and stage.context.index_dir else {}
    texts: dict[str, int] = {}  # text -> position in the batch to encode
    plan: list[list[tuple[str, Any]]] = []
    for r in rankings:
        items: list[tuple[str, Any]] = []
        for c in r.candidates:
            doc = c.document or stored.get(c.doc_id)
            if c.document is None and c.doc_id in vectors:
                items.append(("stored", c.doc_id))
            elif doc is not None:
                items.append(("text", texts.setdefault(doc.contents, len(texts))))
            else:
                items.append(("none", None))
        plan.append(items)
    started = time.perf_counter()
    encoded = stage.encoding.encode_cached(list(texts), "document")[0] if texts else None
    encode_s = time.perf_counter() - started
    results = []
    for r, qvec, items in zip(rankings, prepared, plan, strict=True):
        scores = []
        for kind, ref in items:
            if kind == "stored":
                scores.append(float(np.dot(vectors[ref], qvec)))
            elif kind == "text":
                scores.append(float(np.dot(encoded[ref], qvec)))
            else:
                scores.append(-1.0)
        if any(kind == "none" for kind, _ in items):
            r.notes.append(f"{stage.name}: some supplied candidates have no text anywhere; scored -1")
        if texts:
            r.calls.append(
                ModelCall(
                    stage.name,
                    stage.config.model,
                    seconds=encode_s / len(rankings),
                    note="passage embeddings",
                )
            )
        results.append(scores)
    return results
