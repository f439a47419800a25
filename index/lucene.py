"""Lucene plumbing shared by the Lucene-backed indexes (BM25, SPLADE impact): Java classes, writers,
id documents and id filters. Starting the JVM happens on first use (``java()``)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import cache
from pathlib import Path
from types import SimpleNamespace
from typing import Any

_CLASSES = {
    "Args": "io.anserini.index.IndexCollection$Args",
    "Generator": "io.anserini.index.generator.DefaultLuceneDocumentGenerator",
    "EnglishAnalyzer": "io.anserini.analysis.DefaultEnglishAnalyzer",
    "JsonDocument": "io.anserini.collection.JsonCollection$Document",
    "BagOfWords": "io.anserini.search.query.BagOfWordsQueryGenerator",
    "WhitespaceAnalyzer": "org.apache.lucene.analysis.core.WhitespaceAnalyzer",
    "IndexWriter": "org.apache.lucene.index.IndexWriter",
    "IndexWriterConfig": "org.apache.lucene.index.IndexWriterConfig",
    "OpenMode": "org.apache.lucene.index.IndexWriterConfig$OpenMode",
    "IndexOptions": "org.apache.lucene.index.IndexOptions",
    "FSDirectory": "org.apache.lucene.store.FSDirectory",
    "Paths": "java.nio.file.Paths",
    "Term": "org.apache.lucene.index.Term",
    "ArrayList": "java.util.ArrayList",
    "HashMap": "java.util.HashMap",
    "Integer": "java.lang.Integer",
    "TermInSetQuery": "org.apache.lucene.search.TermInSetQuery",
    "BooleanBuilder": "org.apache.lucene.search.BooleanQuery$Builder",
    "Occur": "org.apache.lucene.search.BooleanClause$Occur",
    "MatchAll": "org.apache.lucene.search.MatchAllDocsQuery",
    "Version": "org.apache.lucene.util.Version",
    "LuceneDocument": "org.apache.lucene.document.Document",
    "Field": "org.apache.lucene.document.Field",
    "FieldType": "org.apache.lucene.document.FieldType",
    "StringField": "org.apache.lucene.document.StringField",
    "BinaryDocValuesField": "org.apache.lucene.document.BinaryDocValuesField",
    "Store": "org.apache.lucene.document.Field$Store",
    "BytesRef": "org.apache.lucene.util.BytesRef",
    "StringReader": "java.io.StringReader",
}


@cache
def java() -> SimpleNamespace:
    """The Java classes the Lucene indexes use (starts the JVM on first call)."""
    from streamrank.index.jvm import ensure_jvm

    ensure_jvm()
    from jnius import autoclass

    return SimpleNamespace(**{key: autoclass(name) for key, name in _CLASSES.items()})


def id_document(doc_id: str) -> Any:
    """A Lucene document holding only its id (stored, and as doc values, as Anserini writes it)."""
    j = java()
    lucene_doc = j.LuceneDocument()
    lucene_doc.add(j.StringField("id", doc_id, j.Store.YES))
    lucene_doc.add(j.BinaryDocValuesField("id", j.BytesRef(doc_id.encode())))
    return lucene_doc


def open_writer(folder: Path, analyzer: Any, create: bool) -> Any:
    """An IndexWriter on ``folder``: a new index (``create``) or appending to the one there."""
    j = java()
    config = j.IndexWriterConfig(analyzer)
    config.setOpenMode(j.OpenMode.CREATE if create else j.OpenMode.APPEND)
    config.setRAMBufferSizeMB(256.0)
    return j.IndexWriter(j.FSDirectory.open(j.Paths.get(str(folder))), config)


def write_with(folder: Path, analyzer: Any, create: bool, apply: Callable[[Any], None], merge: bool = False) -> None:
    """Open a writer, ``apply(writer)``, optionally merge to one segment, commit and close."""
    writer = open_writer(folder, analyzer, create)
    try:
        apply(writer)
        if merge:
            writer.forceMerge(1)
        writer.commit()
    finally:
        writer.close()


def id_filter(doc_ids: Sequence[str]) -> Any:
    """A query matching exactly the documents with these ids."""
    j = java()
    terms = j.ArrayList()
    for doc_id in doc_ids:
        terms.add(j.Term("id", doc_id).bytes())
    return j.TermInSetQuery("id", terms)


def put_document(writer: Any, doc_id: str, lucene_doc: Any, replace: bool) -> None:
    """Add ``lucene_doc``, replacing any document with the same id when ``replace``."""
    if replace:
        writer.updateDocument(java().Term("id", doc_id), lucene_doc)
    else:
        writer.addDocument(lucene_doc)


def live_ids(index_searcher: Any) -> list[str]:
    """Ids of every live document a Lucene ``IndexSearcher`` sees."""
    reader = index_searcher.getIndexReader()
    top = index_searcher.search(java().MatchAll(), max(1, int(reader.numDocs())))
    stored = index_searcher.storedFields()
    return [stored.document(hit.doc).get("id") for hit in top.scoreDocs]
