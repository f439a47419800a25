"""The schemathesis run of test_service_fuzz.py over a real BM25 pipeline (pyserini/Lucene, the
SQLite store) on a 40-document corpus, so generated ids, texts and queries reach Lucene: at least
1,000 requests, no 5xx, every default check passing."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from test_service_fuzz import API_KEY, LIMITS, check, fuzz, started
from test_service_support import REPO, write_topic_corpus

from streamrank.compose import load_pipeline
from streamrank.service.settings import load_settings

pytestmark = pytest.mark.slow

BM25 = REPO / "configs" / "bm25.toml"
MAX_EXAMPLES = 50
"""Per operation and phase; about 1,200 requests (each accepted upsert is a Lucene commit)."""


@pytest.fixture(scope="module")
def bm25_app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    folder: Path = write_topic_corpus(tmp_path_factory.mktemp("fuzz-bm25"), 40)
    pipeline = load_pipeline(BM25, corpus=str(folder), index_dir=folder / "index")
    try:
        pipeline.index()
    finally:
        pipeline.close()
    settings = load_settings(
        env={}, pipelines=[str(BM25)], corpus=str(folder), index_dir=str(folder / "index"), api_key=API_KEY, **LIMITS
    )
    with started(settings) as application:
        yield application


def test_fuzz_openapi_over_bm25_no_server_errors(bm25_app: Any, summary_line: Callable[[str], None]) -> None:
    check(fuzz(bm25_app, MAX_EXAMPLES), "BM25 pipeline, pyserini", summary_line)
