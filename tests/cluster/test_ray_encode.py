"""``streamrank index --ray``: corpus vectors from Ray Data actors equal the local encoding (the largest
difference is reported), and an index built from them searches like the local one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cluster_support import RAY_MISSING, local_pipeline, write_pipelines

pytest.importorskip("ray.data", reason=RAY_MISSING)

from streamrank.index.dense import DenseRetriever  # noqa: E402
from streamrank.service.ray_encode import encode_on_ray, index_on_ray  # noqa: E402
from streamrank.types import Document  # noqa: E402

pytestmark = pytest.mark.slow


def test_ray_data_vectors_equal_local_encoding(
    ray_head: Any, corpus: Any, docs: list[Document], minilm: Any, summary_line: Any
) -> None:
    sample = docs[:96]
    local = local_pipeline(corpus.dense, corpus.index, minilm)
    stage = local.stages[0]
    assert isinstance(stage, DenseRetriever)
    expected = stage.encode_documents(sample)
    remote = encode_on_ray({"kind": "dense"}, sample, actors=1, cpus_per_actor=0.5, batch_size=32, torch_threads=1)
    got = np.stack([remote[d.id] for d in sample])
    diff = float(np.abs(got - expected).max())
    summary_line(f"ray data: {len(sample)} MiniLM vectors, max abs difference from local encoding {diff:.2e}")
    assert sorted(remote) == sorted(d.id for d in sample)
    assert diff < 1e-5
    local.close()


def test_index_on_ray_builds_shards_without_local_encoding(
    ray_head: Any, tmp_path: Path, docs: list[Document], minilm: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    sample = docs[:64]
    paths = write_pipelines(tmp_path / "pipelines")
    pipeline = local_pipeline(paths.sharded, tmp_path / "index", minilm)
    pipeline.context.store.upsert(sample)

    def no_local_encoding(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the corpus was encoded locally")

    monkeypatch.setattr(DenseRetriever, "encode_documents", no_local_encoding)
    assert index_on_ray(pipeline, actors=1, cpus_per_actor=0.5, batch_size=32) == {"dense": len(sample)}
    assert sorted(pipeline.stages[0].indexed_ids()) == sorted(d.id for d in sample)
    monkeypatch.undo()
    top = pipeline.search(sample[5].title, k=3)
    assert top.candidates[0].doc_id == sample[5].id
    assert index_on_ray(pipeline) == {}  # every shard exists: nothing is encoded again
    pipeline.close()
