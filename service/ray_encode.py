"""``streamrank index --ray``: the corpus streamed through Ray Data, vectors written by the workers.

For every dense stage of the pipeline (sharded or not) whose index is missing (or ``--rebuild``):

1. ``ray.data.read_json`` streams the corpus file (BEIR ``corpus.jsonl``; one record ->
   :func:`~streamrank.datasets.formats.beir_document`).
2. ``map_batches`` on an actor pool (:class:`EncodeBatch`, ``num_gpus`` when asked) encodes each
   batch with the stage's own encoder, built from its options (prompts, prefixes, dtype, low-rank
   compression as the local path has them).
3. ``map_batches`` (:func:`write_parts`) writes each batch's vectors, split by owning shard, as
   ``.npz`` parts under ``<index_dir>/.ray-vectors/<stage>/<shard>/``; only row counts come back.
4. One Ray task per shard (or one for an unsharded index) builds that index from its parts
   (:func:`build_from_parts`), in the worker.

The driver never holds the corpus or its vectors: it streams the corpus into the store in chunks,
sees row counts, and builds the other stages (BM25...) as ``streamrank index`` does, so its memory stays
flat as the corpus grows (``streamrank bench ray-index`` measures it).

Vectors equal the local path's up to float rounding (batches of another composition pad to other
lengths); ``tests/cluster/test_ray_encode.py`` reports the largest difference, and
``python -m streamrank.service.ray_encode LOCAL_DENSE_DIR RAY_DENSE_DIR`` prints it for two built
(unsharded) dense index folders (:func:`vector_difference`).
"""

from __future__ import annotations

import itertools
import logging
import shutil
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import ray

from streamrank.pipeline import Pipeline

log = logging.getLogger("streamrank.service.ray")
STORE_CHUNK = 2000
"""Documents per store transaction while the driver streams the corpus into the store."""


class EncodeBatch:
    """A Ray Data actor: one dense stage's encoder, loaded once, encoding batches of corpus records."""

    def __init__(self, options: dict[str, Any], device: str | None, torch_threads: int | None) -> None:
        from streamrank.compose import FACTORY
        from streamrank.context import PipelineContext

        if torch_threads is not None:
            import torch

            torch.set_num_threads(torch_threads)
        self.stage = FACTORY.build(dict(options), PipelineContext(None, device=device, factory=FACTORY), "ray encode")

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        from streamrank.datasets.formats import beir_document

        fields = [f for f in ("_id", "title", "text") if f in batch]
        docs = [beir_document({f: batch[f][n] for f in fields}) for n in range(len(batch["_id"]))]
        return {"id": np.array([d.id for d in docs], dtype=object), "vector": self.stage.encode_documents(docs)}


def write_parts(batch: dict[str, Any], folder: str, shards: int) -> dict[str, Any]:
    """Write one batch's vectors as a part per owning shard (``<folder>/<shard>/part-*.npz``); row counts back."""
    from streamrank.index.sharded import shard_of

    ids = [str(i) for i in batch["id"]]
    owners = np.array([shard_of(i, shards) if shards > 1 else 0 for i in ids])
    counts = []
    for shard in sorted(set(owners.tolist())):
        rows = np.flatnonzero(owners == shard)
        target = Path(folder) / str(shard)
        target.mkdir(parents=True, exist_ok=True)
        np.savez(target / f"part-{uuid.uuid4().hex}.npz", ids=np.array([ids[r] for r in rows]), vectors=batch["vector"][rows])
        counts.append(len(rows))
    return {"rows": np.array(counts or [0])}


class PartVectors(Mapping[str, np.ndarray]):
    """The vectors of one shard's parts (doc id -> row), loaded in the worker that builds the shard."""

    def __init__(self, folder: Path) -> None:
        parts = [np.load(p) for p in sorted(folder.glob("part-*.npz"))]
        ids = [str(i) for part in parts for i in part["ids"]]
        self.vectors = np.concatenate([part["vectors"] for part in parts]) if parts else np.zeros((0, 0), np.float32)
        self.rows = {doc_id: n for n, doc_id in enumerate(ids)}  # a later part wins for a repeated id

    def __getitem__(self, doc_id: str) -> np.ndarray:
        return self.vectors[self.rows[doc_id]]

    def __iter__(self) -> Iterator[str]:
        return iter(self.rows)

    def __len__(self) -> int:
        return len(self.rows)


def build_from_parts(
    index_dir: str, corpus: str | None, options: dict[str, Any], shard: int | None, shards: int, parts: str, rebuild: bool
) -> int:
    """In a Ray task: build one shard's index (``shard``) or the unsharded index (None) from its parts."""
    from streamrank.compose import FACTORY
    from streamrank.context import PipelineContext
    from streamrank.index.shard_worker import ShardWorker

    context = PipelineContext(Path(index_dir), corpus=corpus, factory=FACTORY)
    vectors = PartVectors(Path(parts) / str(shard or 0))
    try:
        if shard is not None:
            ShardWorker(options, context, shard, shards).build(rebuild, vectors)
        else:
            stage: Any = FACTORY.build(dict(options), context, "ray index")
            with stage.supply_embeddings(vectors):
                stage.build(context.store, rebuild=rebuild)
        return len(vectors)
    finally:
        context.close()


def dense_options(stage: Any) -> tuple[dict[str, Any], int] | None:
    """(the dense stage table behind ``stage``, its shard count) for a dense stage or a sharded one over dense."""
    from streamrank.index.dense import DenseRetriever
    from streamrank.index.sharded_stage import ShardedRetriever

    if isinstance(stage, DenseRetriever):
        return stage.config.model_dump(exclude_unset=True) | {"kind": "dense"}, 1
    if isinstance(stage, ShardedRetriever) and isinstance(stage.template, DenseRetriever):
        return dict(stage.options), stage.n
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


def corpus_file(pipeline: Pipeline) -> Path:
    """The JSON-lines corpus file Ray Data reads (a ConfigError for a corpus without one)."""
    from streamrank.datasets import load_dataset
    from streamrank.errors import ConfigError

    if pipeline.context.corpus is None:
        raise ConfigError("streamrank index --ray: the pipeline names no corpus to index")
    found = load_dataset(pipeline.context.corpus).corpus_file()
    if found is None:
        raise ConfigError(f"streamrank index --ray reads a BEIR corpus.jsonl; corpus {pipeline.context.corpus!r} has none")
    return found


def encode_to_parts(
    options: dict[str, Any], source: Path, parts: Path, shards: int, *, actors: int, cpus_per_actor: float,
    gpus_per_actor: float, batch_size: int, device: str | None, torch_threads: int | None,
) -> int:
    """Stream ``source`` through the encoder actors into shard parts under ``parts``; rows written."""
    light = {"num_cpus": 0.25}  # reading and writing parts: small, and never starved by the encoder actors
    encoded = ray.data.read_json(str(source), **light).map_batches(
        EncodeBatch,
        fn_constructor_args=(options, device, torch_threads),
        batch_size=batch_size,
        batch_format="numpy",
        concurrency=actors,
        num_cpus=cpus_per_actor,
        num_gpus=gpus_per_actor,
    )
    written = encoded.map_batches(write_parts, fn_args=(str(parts), shards), batch_format="numpy", batch_size=None, **light)
    return sum(int(b["rows"].sum()) for b in written.iter_batches(batch_size=None, batch_format="numpy"))


def vector_difference(first: Path, second: Path) -> float:
    """Largest absolute difference between the vectors of the same documents in two unsharded dense
    index folders (``embeddings.npy`` rows in ``ids.json`` order); a ConfigError when their ids differ."""
    import json

    from streamrank.errors import ConfigError

    loaded = []
    for folder in (Path(first), Path(second)):
        ids = json.loads((folder / "ids.json").read_text())
        loaded.append((ids, np.load(folder / "embeddings.npy", mmap_mode="r")))
    (ids_a, vectors_a), (ids_b, vectors_b) = loaded
    if sorted(ids_a) != sorted(ids_b):
        raise ConfigError(f"{first} and {second} index different documents ({len(ids_a)} vs {len(ids_b)} ids)")
    rows_b = {doc_id: n for n, doc_id in enumerate(ids_b)}
    order = np.array([rows_b[doc_id] for doc_id in ids_a], dtype=np.int64)
    return float(np.abs(np.asarray(vectors_a) - np.asarray(vectors_b)[order]).max(initial=0.0))


def index_on_ray(
    pipeline: Pipeline, *, rebuild: bool = False, actors: int = 2, cpus_per_actor: float = 1.0, gpus_per_actor: float = 0.0,
    batch_size: int = 256,
) -> dict[str, int]:
    """``Pipeline.index`` with every dense index built by Ray (see the module docstring); returns the
    documents encoded per stage. Ray must be initialised (``streamrank index --ray`` starts a local
    head or joins ``--address``)."""
    context = pipeline.context
    index_dir = context.require_index_dir("streamrank index --ray")
    cpus = float(ray.cluster_resources().get("CPU", 1.0))
    # the actors leave half a CPU to the read and write tasks, or the stream stalls on a small cluster
    cpus_per_actor = min(cpus_per_actor, max(0.1, (cpus - 0.5) / actors))
    store = context.store
    if rebuild or len(store) == 0:
        documents = pipeline.corpus_documents()
        while chunk := list(itertools.islice(documents, STORE_CHUNK)):
            store.upsert(chunk)
    built: set[int] = set()
    encoded: dict[str, int] = {}
    for stage in pipeline.iter_stages():
        found = dense_options(stage)
        if found is None or not needs_vectors(stage, rebuild):
            continue
        options, shards = found
        parts = index_dir / ".ray-vectors" / stage.name
        shutil.rmtree(parts, ignore_errors=True)
        log.info("encoding the corpus for %r with Ray Data (%d actors)", stage.name, actors)
        try:
            rows = encode_to_parts(
                options, corpus_file(pipeline), parts, shards, actors=actors, cpus_per_actor=cpus_per_actor,
                gpus_per_actor=gpus_per_actor, batch_size=batch_size, device=context.device,
                torch_threads=max(1, int(cpus_per_actor)),
            )
            task = ray.remote(build_from_parts).options(num_cpus=cpus_per_actor, num_gpus=0)
            targets = list(range(shards)) if shards > 1 else [None]
            ray.get([task.remote(str(index_dir), context.corpus, options, s, shards, str(parts), rebuild) for s in targets])
        finally:
            shutil.rmtree(parts, ignore_errors=True)
        built.add(id(stage))
        encoded[stage.name] = rows
    for stage in pipeline.iter_stages():  # the rest as `streamrank index` builds it
        if id(stage) not in built:  # built by the workers: checking them here would read every document of a shard
            stage.build(store, rebuild=rebuild)
    return encoded



def main(argv: list[str]) -> int:
    """``python -m streamrank.service.ray_encode FIRST_DENSE_DIR SECOND_DENSE_DIR``: the largest difference."""
    first, second = (Path(a) for a in argv)
    print(f"{first} vs {second}: max abs difference {vector_difference(first, second):.3e}")
    return 0


if __name__ == "__main__":
    import sys

    raise SystemExit(main(sys.argv[1:]))
