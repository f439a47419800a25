"""Index manifests: reuse, mismatch, missing; and what importing the index modules loads."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from index_support import N_DOCS, EncodeCounter, bm25, context_for, dense, search

from streamrank.context import PipelineContext
from streamrank.errors import IndexMismatchError, IndexMissingError
from streamrank.index import manifest as mf
from streamrank.index.dense import DenseRetriever
from streamrank.models import MINILM
from streamrank.types import Document


# ---- manifests: reuse, mismatch, missing ---------------------------------------------------------
def test_build_on_matching_index_does_not_reencode(
    ctx: PipelineContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    counter = EncodeCounter(monkeypatch)
    before = mf.read_manifest(ctx.index_dir / "dense")
    dense(ctx).build(ctx.store)
    bm25(ctx).build(ctx.store)
    assert counter.docs == 0
    assert mf.read_manifest(ctx.index_dir / "dense") == before


def test_rebuild_true_reencodes(copy_dir: Path, minilm: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    ctx = context_for(copy_dir, minilm)
    stored = np.load(copy_dir / "dense" / "embeddings.npy")
    calls = []

    def fake_encode(stage: DenseRetriever, documents: Sequence[Document], checkpoint: object = None) -> np.ndarray:
        calls.append(len(documents))
        return stored[: len(documents)]

    monkeypatch.setattr(DenseRetriever, "encode_documents", fake_encode)
    created = mf.read_manifest(copy_dir / "dense")["generation"]
    dense(ctx).build(ctx.store, rebuild=True)
    assert calls == [N_DOCS]
    assert mf.read_manifest(copy_dir / "dense")["generation"] != created
    assert not list(copy_dir.glob("dense.*"))  # no staging or retired folder left behind


def test_manifest_records_settings_corpus_and_versions(ctx: PipelineContext) -> None:
    m = mf.read_manifest(ctx.index_dir / "dense")
    assert m["settings"]["model"] == MINILM and m["settings"]["index_type"] == "flat"
    assert m["info"]["dimension"] == 384 and m["doc_count"] == N_DOCS
    assert m["corpus_checksum"] == ctx.store.checksum()
    assert {"faiss-cpu", "sentence-transformers", "torch"} <= set(m["libraries"])
    b = mf.read_manifest(ctx.index_dir / "bm25")
    assert b["settings"]["stemmer"] == "porter" and b["libraries"]["lucene"].startswith("9.")
    assert b["doc_count"] == N_DOCS and b["corpus_checksum"] == m["corpus_checksum"]


def test_index_built_with_another_model_is_refused(copy_dir: Path, minilm: Any) -> None:
    path = copy_dir / "dense" / mf.MANIFEST_NAME
    manifest = json.loads(path.read_text())
    manifest["settings"]["model"] = "acme/tiny-random-encoder"
    path.write_text(json.dumps(manifest))
    ctx = context_for(copy_dir, minilm)
    for action in (lambda: dense(ctx).build(ctx.store), lambda: search(dense(ctx), "cells")):
        with pytest.raises(IndexMismatchError) as err:
            action()
        message = str(err.value)
        assert "model" in message and "acme/tiny-random-encoder" in message and MINILM in message
        assert "--rebuild" in message


def test_pipeline_asking_for_another_setting_is_refused(ctx: PipelineContext) -> None:
    with pytest.raises(IndexMismatchError, match="index_type = 'flat'.*'hnsw'"):
        dense(ctx, index_type="hnsw").build(ctx.store)
    with pytest.raises(IndexMismatchError, match="stemmer"):
        search(bm25(ctx, stemmer="krovetz"), "cells")
    # an alias of the same model is the same model
    dense(ctx, model="all-MiniLM-L6-v2").build(ctx.store)


def test_index_of_another_corpus_is_refused(copy_dir: Path, minilm: Any, docs: list[Document]) -> None:
    ctx = context_for(copy_dir, minilm)
    ctx.store.upsert([Document(docs[0].id, docs[0].text + " (revised)", docs[0].title)])
    with pytest.raises(IndexMismatchError, match="another corpus"):
        bm25(ctx).build(ctx.store)


def test_missing_index_says_how_to_build_it(tmp_path: Path, minilm: Any) -> None:
    ctx = context_for(tmp_path / "empty", minilm)
    for stage in (bm25(ctx), dense(ctx)):
        with pytest.raises(IndexMissingError, match="streamrank index --pipeline"):
            search(stage, "cells")


# ---- process-level ------------------------------------------------------------------------------
def test_index_modules_import_no_heavy_libraries() -> None:
    code = (
        "import sys, streamrank.index.bm25, streamrank.index.dense, streamrank.index.fusion, "
        "streamrank.index.manifest, streamrank.index.jvm\n"
        "heavy = [m for m in ('torch', 'faiss', 'pyserini', 'jnius', 'sentence_transformers') if m in sys.modules]\n"
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
