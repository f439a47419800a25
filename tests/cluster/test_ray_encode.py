"""``streamrank index --ray``: Ray Data streams the corpus file, encoder actors encode it, workers write each
shard's vectors and build the shard: the vectors equal the local encoding (the largest difference is
reported), the driver never encodes, and an index built this way searches like the local one."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from cluster_support import RAY_MISSING, local_pipeline

pytest.importorskip("ray.data", reason=RAY_MISSING)

from streamrank.index.dense import DenseRetriever  # noqa: E402
from streamrank.service.ray_encode import index_on_ray, vector_difference  # noqa: E402
from streamrank.types import Document  # noqa: E402

pytestmark = pytest.mark.slow


def beir_folder(folder: Path, docs: list[Document]) -> Path:
    folder.mkdir(parents=True)
    lines = [json.dumps({"_id": d.id, "title": d.title, "text": d.text, "metadata": {}}) for d in docs]
    (folder / "corpus.jsonl").write_text("\n".join(lines) + "\n")
    (folder / "queries.jsonl").write_text(json.dumps({"_id": "q1", "text": "a query"}) + "\n")
    (folder / "qrels").mkdir()
    (folder / "qrels" / "test.tsv").write_text(f"query-id\tcorpus-id\tscore\nq1\t{docs[0].id}\t1\n")
    return folder


def pipeline_file(path: Path, corpus: Path, shards: int) -> Path:
    path.write_text(f'name = "dense"\ncorpus = "{corpus}"\nshards = {shards}\n[[stages]]\nkind = "dense"\nk = 100\n')
    return path


@pytest.mark.parametrize("shards", [1, 4])
def test_ray_data_vectors_equal_local_encoding_and_the_driver_never_encodes(
    ray_head: Any, tmp_path: Path, docs: list[Document], minilm: Any, summary_line: Any,
    monkeypatch: pytest.MonkeyPatch, shards: int,
) -> None:
    sample = docs[:96]
    corpus = beir_folder(tmp_path / "corpus", sample)
    pipeline = local_pipeline(pipeline_file(tmp_path / "p.toml", corpus, shards), tmp_path / "index", minilm)
    local = local_pipeline(pipeline_file(tmp_path / "local.toml", corpus, 1), tmp_path / "local", minilm)
    local.index()  # `streamrank index` in process: the reference vectors

    def no_local_encoding(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the corpus was encoded in the driver")

    monkeypatch.setattr(DenseRetriever, "encode_documents", no_local_encoding)  # the driver only: workers are other processes
    assert index_on_ray(pipeline, actors=1, cpus_per_actor=0.5, batch_size=32) == {"dense": len(sample)}
    monkeypatch.undo()
    stage = pipeline.stages[0]
    assert sorted(stage.indexed_ids()) == sorted(d.id for d in sample)
    assert not (tmp_path / "index" / ".ray-vectors").exists() or not any((tmp_path / "index" / ".ray-vectors").iterdir())
    fresh = local_pipeline(pipeline_file(tmp_path / "p.toml", corpus, shards), tmp_path / "index", minilm)
    if shards == 1:  # the comparison `python -m streamrank.service.ray_encode LOCAL RAY` prints
        diff = vector_difference(local.stages[0].folder, fresh.stages[0].folder)
        summary_line(f"ray data: {len(sample)} SciFact abstracts, MiniLM, max abs difference from local encoding {diff:.2e}")
        assert diff <= 1e-6
    top = fresh.search(sample[5].title, k=3)
    assert top.candidates[0].doc_id == sample[5].id
    assert index_on_ray(fresh) == {}  # every index exists: nothing is encoded again
    fresh.close()
    pipeline.close()
    local.close()
