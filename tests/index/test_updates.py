"""Incremental updates of the BM25 and dense indexes: add, delete, concurrent readers, failures."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
from index_support import (
    HYBRID,
    N_DOCS,
    NEW_DOC,
    EncodeCounter,
    bm25,
    context_for,
    dense,
    search,
    write_pipeline,
)

from streamrank.compose import load_pipeline
from streamrank.index import manifest as mf
from streamrank.index.bm25 import BM25Retriever
from streamrank.models import MINILM
from streamrank.types import Document


# ---- incremental updates -------------------------------------------------------------------------
def test_add_and_delete_without_rebuild(
    copy_dir: Path, tmp_path: Path, minilm: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    pipeline = load_pipeline(write_pipeline(tmp_path, HYBRID), index_dir=copy_dir)
    pipeline.context.shared(("sentence-encoder", MINILM), lambda: minilm)
    counter = EncodeCounter(monkeypatch)
    bm25_stage, dense_stage = pipeline.stages[0].children  # type: ignore[attr-defined]
    query = "axolotl limb regeneration in microgravity"

    pipeline.add_documents([NEW_DOC])
    assert counter.docs == 1  # only the new document was encoded
    for stage in (bm25_stage, dense_stage):
        assert search(stage, query)[0].candidates[0].doc_id == NEW_DOC.id
        assert stage.manifest()["doc_count"] == N_DOCS + 1
        assert stage.manifest()["corpus_checksum"] == pipeline.context.store.checksum()
    top = pipeline.search(query, k=3).candidates[0]
    assert top.doc_id == NEW_DOC.id and top.document == NEW_DOC
    assert set(top.stage_scores) == {"bm25", "dense", "fusion"}

    # replacing a document: the old text is no longer found, the new one is
    changed = Document(NEW_DOC.id, "Tardigrades survive the vacuum of space.", "Tardigrade survival")
    pipeline.add_documents([changed])
    assert dense_stage.manifest()["info"]["masked_rows"] == 1
    for stage in (bm25_stage, dense_stage):
        assert stage.manifest()["doc_count"] == N_DOCS + 1
        assert search(stage, "tardigrades in the vacuum of space")[0].candidates[0].doc_id == NEW_DOC.id
    assert NEW_DOC.id not in search(bm25_stage, query)[0].doc_ids()  # no term of the old text left
    hits = [c for c in search(dense_stage, query)[0].candidates if c.doc_id == NEW_DOC.id]
    q = dense_stage.encode_queries([query])[0]
    assert len(hits) <= 1  # the old row is masked, never returned beside the new one
    assert all(
        h.score == pytest.approx(float(dense_stage.encode_documents([changed])[0] @ q), abs=1e-4)
        for h in hits
    )

    pipeline.delete_documents([NEW_DOC.id])
    for stage in (bm25_stage, dense_stage):
        assert NEW_DOC.id not in search(stage, "tardigrades in the vacuum of space")[0].doc_ids()
        assert stage.manifest()["doc_count"] == N_DOCS
        assert NEW_DOC.id not in stage.indexed_ids() and len(stage.indexed_ids()) == N_DOCS
    assert len(search(dense_stage, query)[0].candidates) == 50  # masked rows do not shorten results

    # the indexes still match the corpus: index() keeps them and encodes nothing
    counter.docs = 0
    pipeline.index()
    assert counter.docs == 0
    for stage in (bm25_stage, dense_stage):
        assert stage.manifest()["corpus_checksum"] == pipeline.context.store.checksum()
    pipeline.close()


def test_other_instance_sees_updates(copy_dir: Path, minilm: Any) -> None:
    """A second stage on the same folder (another pipeline, or the service) reopens after a change."""
    writer_ctx, reader_ctx = context_for(copy_dir, minilm), context_for(copy_dir, minilm)
    reader = bm25(reader_ctx)
    assert NEW_DOC.id not in search(reader, "axolotl microgravity")[0].doc_ids()
    writer_ctx.store.upsert([NEW_DOC])
    bm25(writer_ctx).add([NEW_DOC])
    assert search(reader, "axolotl microgravity")[0].candidates[0].doc_id == NEW_DOC.id


def test_concurrent_searches_during_updates(copy_dir: Path, minilm: Any, docs: list[Document]) -> None:
    ctx = context_for(copy_dir, minilm)
    stage = bm25(ctx, k=5)
    errors: list[BaseException] = []

    def searching() -> None:
        try:
            for i in range(20):
                assert search(stage, docs[i].title)[0].candidates[0].doc_id == docs[i].id
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=searching) for _ in range(3)]
    for t in threads:
        t.start()
    for i in range(3):
        extra = Document(f"extra-{i}", f"extra document number {i}")
        ctx.store.upsert([extra])
        stage.add([extra])
    for t in threads:
        t.join()
    assert not errors
    assert stage.manifest()["doc_count"] == N_DOCS + 3


def test_failed_rebuild_leaves_the_old_index(
    copy_dir: Path, minilm: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    ctx = context_for(copy_dir, minilm)
    before = mf.read_manifest(copy_dir / "bm25")

    def crash(self: BM25Retriever, folder: Path, documents: list[Document]) -> dict[str, Any]:
        (folder / "_0.cfs").write_bytes(b"half written")
        raise RuntimeError("disk full")

    monkeypatch.setattr(BM25Retriever, "_write", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        bm25(ctx).build(ctx.store, rebuild=True)
    monkeypatch.undo()
    assert mf.read_manifest(copy_dir / "bm25") == before
    assert not list(copy_dir.glob("bm25.*"))
    assert search(bm25(ctx), "cells")[0].candidates


def test_failed_update_is_not_half_applied(
    copy_dir: Path, minilm: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from streamrank.index import dense_segments

    ctx = context_for(copy_dir, minilm)
    stage = dense(ctx)
    ctx.store.upsert([NEW_DOC])

    def torn(path: Path, payload: bytes, end: int) -> int:  # half a record reaches the disk, then it fills up
        with open(path, "ab") as handle:
            handle.write(payload[: len(payload) // 2])
        raise OSError("disk full")

    monkeypatch.setattr(dense_segments, "append", torn)
    with pytest.raises(OSError, match="disk full"):
        stage.add([NEW_DOC])
    monkeypatch.undo()
    for reader in (stage, dense(context_for(copy_dir, minilm))):  # this one and one opened afresh
        assert NEW_DOC.id not in reader.indexed_ids() and len(reader.indexed_ids()) == N_DOCS
        assert NEW_DOC.id not in search(reader, "axolotl limb regeneration")[0].doc_ids()
    stage.add([NEW_DOC])  # and a retry works (the torn tail is cut off)
    assert search(stage, "axolotl limb regeneration")[0].candidates[0].doc_id == NEW_DOC.id
    again = dense(context_for(copy_dir, minilm))
    assert search(again, "axolotl limb regeneration")[0].candidates[0].doc_id == NEW_DOC.id
