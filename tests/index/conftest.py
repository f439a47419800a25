"""Session fixtures of the index tests: the first 300 SciFact docs, MiniLM, and one built index_dir."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
from index_support import N_DOCS, context_for

from streamrank.index.bm25 import BM25Retriever
from streamrank.index.dense import DenseRetriever
from streamrank.models import MINILM, load_sentence_encoder
from streamrank.types import Document


@pytest.fixture(scope="session")
def docs(scifact_head: Any) -> list[Document]:
    return scifact_head(N_DOCS)


@pytest.fixture(scope="session")
def minilm() -> Any:
    return load_sentence_encoder(MINILM, "cpu")


@pytest.fixture(scope="session")
def built(tmp_path_factory: pytest.TempPathFactory, docs: list[Document], minilm: Any) -> Path:
    """An index_dir with the store, a BM25 index and a flat dense index (built once)."""
    index_dir = tmp_path_factory.mktemp("scifact300")
    ctx = context_for(index_dir, minilm)
    ctx.store.upsert(docs)
    BM25Retriever.from_dict({"kind": "bm25"}, ctx).build(ctx.store)
    DenseRetriever.from_dict({"kind": "dense"}, ctx).build(ctx.store)
    ctx.close()
    return index_dir


@pytest.fixture
def copy_dir(built: Path, tmp_path: Path) -> Path:
    """A private copy of the built index_dir for tests that change it."""
    target = tmp_path / "index"
    shutil.copytree(built, target)
    return target


@pytest.fixture
def ctx(built: Path, minilm: Any):
    context = context_for(built, minilm)
    yield context
    context.close()
