"""``streamrank index --ray``: the corpus encoded with Ray Data, then the indexes written as usual.

Every dense stage of the pipeline (sharded or not) whose index is missing (or ``--rebuild``) gets its
document vectors from ``Dataset.map_batches`` over actors (:class:`EncodeBatch`) that each load the
encoder once, built from the stage's own options, so prompts, prefixes, dtype and low-rank
compression are the local path's. The vectors are then handed to the stage
(``supply_embeddings``) and ``Pipeline.index`` writes the index or the shards without encoding.
The store, BM25 and the other indexes are built in this process as ``streamrank index`` builds them.

Vectors equal the local path's up to float rounding: the encoder sees batches of another
composition (length-bucketed within each Ray block instead of over the whole corpus), so the
padded lengths differ; ``tests/cluster/test_ray_encode.py`` reports the largest difference.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from typing import Any

import ray

from streamrank.pipeline import Pipeline
from streamrank.types import Document

log = logging.getLogger("streamrank.service.ray")


class EncodeBatch:
    """A Ray Data actor: one dense stage's encoder, loaded once, encoding batches of documents."""

    def __init__(self, options: dict[str, Any], device: str | None, torch_threads: int | None) -> None:
        from streamrank.context import PipelineContext
        from streamrank.index.dense import DenseRetriever

        if torch_threads is not None:
            import torch

            torch.set_num_threads(torch_threads)
        self.stage = DenseRetriever.from_dict(options, PipelineContext(None, device=device))

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        vectors = self.stage.encoding.encode([str(t) for t in batch["text"]], "document")  # type: ignore[attr-defined]
        return {"id": batch["id"], "vector": vectors}


def encode_on_ray(
    options: dict[str, Any],
    documents: Sequence[Document],
    *,
    actors: int = 2,
    cpus_per_actor: float = 1.0,
    batch_size: int = 256,
    device: str | None = None,
    torch_threads: int | None = None,
) -> dict[str, Any]:
    """Embeddings (doc id -> vector) of ``documents`` as the dense stage ``options`` encodes them."""
    dataset = ray.data.from_items([{"id": d.id, "text": d.contents} for d in documents])
    encoded = dataset.map_batches(
        EncodeBatch,
        fn_constructor_args=(options, device, torch_threads),
        batch_size=batch_size,
        batch_format="numpy",
        concurrency=actors,
        num_cpus=cpus_per_actor,
    )
    vectors: dict[str, Any] = {}
    for batch in encoded.iter_batches(batch_size=None, batch_format="numpy"):
        vectors.update((str(doc_id), row) for doc_id, row in zip(batch["id"], batch["vector"], strict=True))
    return vectors


def dense_options(stage: Any) -> dict[str, Any] | None:
    """The dense stage table behind ``stage`` (a dense stage, or a sharded one over dense), else None."""
    from streamrank.index.dense import DenseRetriever
    from streamrank.index.sharded_stage import ShardedRetriever

    if isinstance(stage, DenseRetriever):
        return stage.config.model_dump(exclude_unset=True) | {"kind": "dense"}
    if isinstance(stage, ShardedRetriever) and isinstance(stage.template, DenseRetriever):
        return dict(stage.options)
    return None


def needs_vectors(stage: Any, rebuild: bool) -> bool:
    """Whether building ``stage`` now would encode the corpus (its index, or a shard's, is missing)."""
    from streamrank.index import manifest as mf
    from streamrank.index.sharded_stage import ShardedRetriever

    if rebuild:
        return True
    if isinstance(stage, ShardedRetriever):
        present = stage.group.call("has_index", {s: () for s in range(stage.n)})
        return not all(present.values())
    return mf.read_manifest(stage.folder) is None


def index_on_ray(
    pipeline: Pipeline, *, rebuild: bool = False, actors: int = 2, cpus_per_actor: float = 1.0, batch_size: int = 256
) -> dict[str, int]:
    """``Pipeline.index`` with the dense encoding done by Ray Data; returns documents encoded per stage.

    Ray must be initialised (``streamrank index --ray`` starts a local head or joins ``--address``).
    """
    store = pipeline.context.store
    if rebuild or len(store) == 0:
        store.upsert(pipeline.corpus_documents())
    encoded: dict[str, int] = {}
    with contextlib.ExitStack() as supplied:
        documents: list[Document] | None = None
        for stage in pipeline.iter_stages():
            options = dense_options(stage)
            if options is None or not needs_vectors(stage, rebuild):
                continue
            documents = documents if documents is not None else list(store)
            log.info("encoding %d documents for %r with Ray Data (%d actors)", len(documents), stage.name, actors)
            vectors = encode_on_ray(
                options, documents, actors=actors, cpus_per_actor=cpus_per_actor, batch_size=batch_size,
                device=pipeline.context.device, torch_threads=max(1, int(cpus_per_actor)),
            )
            supplied.enter_context(stage.supply_embeddings(vectors))
            encoded[stage.name] = len(vectors)
        pipeline.index(rebuild=rebuild)
    return encoded
