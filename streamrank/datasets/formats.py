"""Dataset formats: BEIR folders (also the reranking form with given candidates, as TREC-DL) and BRIGHT;
qrels and candidate files."""

from __future__ import annotations

import glob
import hashlib
import json
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

from streamrank.errors import DatasetNotFoundError, StreamRankError
from streamrank.types import Candidate, Document, Query

DEFAULT_CANDIDATE_FILES = ("bm25_top100.json", "bm25_top100.trec")

DocumentLookup = Mapping[str, Document] | Callable[[Sequence[str]], Mapping[str, Document]]


def refuse_test_split(split: str, action: str, advice: str) -> None:
    """Raise unless ``split`` may be used to fit anything: test queries must stay unseen."""
    if split.lower() == "test":
        raise StreamRankError(
            f"refusing to {action} on the test split: test queries must stay unseen; use --split train ({advice})"
        )


# ---- datasets -----------------------------------------------------------------------------------
class Dataset(ABC):
    """One evaluation set: a corpus (unless it is a reranking set), queries and qrels per split."""

    kind: str

    def __init__(self, name: str, path: Path) -> None:
        self.name = name
        self.path = path

    @property
    def has_corpus(self) -> bool:
        return True

    @property
    def rel_level(self) -> int:
        """Minimum grade counted as relevant by binary measures (2 for TREC-DL, as its track does)."""
        return 1

    @abstractmethod
    def corpus(self) -> Iterator[Document]:
        """Every document, in file order."""

    @abstractmethod
    def splits(self) -> list[str]:
        """Names of the splits that have qrels."""

    @abstractmethod
    def _query_texts(self) -> dict[str, str]:
        """Query id -> text for every query in the files, in file order."""

    @abstractmethod
    def _read_qrels(self, split: str) -> dict[str, dict[str, int]]: ...

    def qrels(self, split: str = "test") -> dict[str, dict[str, int]]:
        """Query id -> {doc id: grade} for ``split``."""
        self._check_split(split)
        return self._read_qrels(split)

    def queries(self, split: str = "test") -> list[Query]:
        """The queries judged in ``split``, in file order."""
        judged = self.qrels(split)
        return [Query(id=qid, text=text) for qid, text in self._query_texts().items() if qid in judged]

    def candidates(self, split: str = "test", source: str | None = None) -> dict[str, list[Candidate]] | None:
        """Given candidate lists for the queries of ``split`` (reranking form), or None if none ship."""
        return None

    def excluded_ids(self, split: str = "test") -> dict[str, set[str]]:
        """Per query, documents that must not count in its ranking (BRIGHT); empty elsewhere."""
        return {}

    def documents(self, doc_ids: Sequence[str]) -> dict[str, Document]:
        """Look documents up by id (the ones this dataset knows)."""
        known = self._document_map
        return {i: known[i] for i in doc_ids if i in known}

    @cached_property
    def _document_map(self) -> dict[str, Document]:
        return {d.id: d for d in self.corpus()}

    def corpus_checksum(self) -> str | None:
        """SHA-256 of the corpus file(s), or None for a set without a corpus."""
        files = self._corpus_files()
        if not files:
            return None
        digest = hashlib.sha256()
        for file in files:
            with file.open("rb") as fh:
                for block in iter(lambda fh=fh: fh.read(1 << 20), b""):
                    digest.update(block)
        return digest.hexdigest()

    def _corpus_files(self) -> list[Path]:
        return []

    def corpus_file(self) -> Path | None:
        """A JSON-lines corpus file that other readers (Ray Data) can stream, when the set has one."""
        return None

    def _check_split(self, split: str) -> None:
        if split not in self.splits():
            raise DatasetNotFoundError(
                f"dataset {self.name!r} has no split {split!r} (available: {', '.join(self.splits()) or 'none'})"
            )

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, kind={self.kind!r}, path={str(self.path)!r})"


def beir_document(row: Mapping[str, Any]) -> Document:
    """One record of a BEIR ``corpus.jsonl`` (``_id``, ``title``, ``text``) as a Document."""
    return Document(id=str(row["_id"]), text=row.get("text") or "", title=row.get("title") or "")


class BeirDataset(Dataset):
    """A BEIR-layout folder; without ``corpus.jsonl`` it is a reranking set (kind ``rerank``)."""

    def __init__(self, name: str, path: Path) -> None:
        super().__init__(name, path)
        self.kind = "beir" if (path / "corpus.jsonl").exists() else "rerank"

    @property
    def has_corpus(self) -> bool:
        return self.kind == "beir"

    @property
    def rel_level(self) -> int:
        in_trec_dl = self.path.parent.name == "trec-dl" or re.match(r"dl\d\d", self.path.name)
        return 2 if in_trec_dl else 1

    def corpus(self) -> Iterator[Document]:
        if not self.has_corpus:
            raise DatasetNotFoundError(
                f"{self.name!r} ({self.path}) is a reranking set: it has no corpus.jsonl to index or "
                f"retrieve from. Evaluate it by reranking its candidates "
                f"({', '.join(p.name for p in self._candidate_files()) or 'none found'})."
            )
        return (beir_document(r) for r in _read_jsonl(self.path / "corpus.jsonl"))

    def corpus_file(self) -> Path | None:
        """The ``corpus.jsonl`` file (one JSON record per document; :func:`beir_document` reads one), or None."""
        return self.path / "corpus.jsonl" if self.has_corpus else None

    def splits(self) -> list[str]:
        qrels_dir = self.path / "qrels"
        return (
            sorted(p.stem for p in qrels_dir.iterdir() if p.suffix in {".tsv", ".txt"})
            if qrels_dir.is_dir()
            else []
        )

    @cached_property
    def _queries(self) -> dict[str, str]:
        return {str(row["_id"]): row["text"] for row in _read_jsonl(self.path / "queries.jsonl")}

    def _query_texts(self) -> dict[str, str]:
        return self._queries

    def _read_qrels(self, split: str) -> dict[str, dict[str, int]]:
        path = next(
            p
            for p in (self.path / "qrels" / f"{split}.tsv", self.path / "qrels" / f"{split}.txt")
            if p.exists()
        )
        return read_qrels(path)

    def _candidate_files(self) -> list[Path]:
        return [self.path / n for n in DEFAULT_CANDIDATE_FILES if (self.path / n).exists()]

    def candidates(self, split: str = "test", source: str | None = None) -> dict[str, list[Candidate]] | None:
        """Read ``source`` (a file name in the folder or a path), default ``bm25_top100.json``/``.trec``."""
        if source is not None:
            path = Path(source) if Path(source).exists() else self.path / source
        else:
            found = self._candidate_files()
            if not found:
                return None
            path = found[0]
        judged = self.qrels(split)
        pools = load_candidates(path, corpus_lookup=self.documents)
        return {qid: pool for qid, pool in pools.items() if qid in judged}

    @cached_property
    def _document_map(self) -> dict[str, Document]:
        if self.has_corpus:
            return {d.id: d for d in self.corpus()}
        # A reranking set knows the passages its JSON candidate files carry.
        docs: dict[str, Document] = {}
        for path in sorted(self.path.glob("*.json")):
            for pool in load_candidates(path).values():
                docs.update((c.doc_id, c.document) for c in pool if c.document is not None)
        return docs

    def _corpus_files(self) -> list[Path]:
        return [self.path / "corpus.jsonl"] if self.has_corpus else []


class BrightDataset(Dataset):
    """One BRIGHT subset from a local folder in the Hub's layout (``documents/``, ``examples/``)."""

    kind = "bright"

    def __init__(self, path: Path, subset: str) -> None:
        super().__init__(f"bright/{subset}", path)
        self.subset = subset

    def corpus(self) -> Iterator[Document]:
        rows = _read_rows(self.path / "documents", self.subset)
        return (Document(id=str(r["id"]), text=r.get("content") or "") for r in rows)

    def splits(self) -> list[str]:
        return ["test"]

    @cached_property
    def _examples(self) -> list[dict[str, Any]]:
        return list(_read_rows(self.path / "examples", self.subset))

    def _query_texts(self) -> dict[str, str]:
        return {str(ex["id"]): ex["query"] for ex in self._examples}

    def _read_qrels(self, split: str) -> dict[str, dict[str, int]]:
        return {str(ex["id"]): {str(g): 1 for g in ex.get("gold_ids") or []} for ex in self._examples}

    def excluded_ids(self, split: str = "test") -> dict[str, set[str]]:
        self._check_split(split)
        excluded = {
            str(ex["id"]): {str(d) for d in ex.get("excluded_ids") or []} - {"N/A"} for ex in self._examples
        }
        return {qid: ids for qid, ids in excluded.items() if ids}

    def _corpus_files(self) -> list[Path]:
        return [rows_file(self.path / "documents", self.subset)[0]]


# ---- files --------------------------------------------------------------------------------------
def _read_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                yield json.loads(line)


def rows_file(folder: Path, subset: str) -> list[Path]:
    """The file(s) holding ``subset`` in a BRIGHT folder: jsonl, parquet, or Hub-style parquet shards."""
    for name in (f"{subset}.jsonl", f"{subset}.parquet"):
        if (folder / name).exists():
            return [folder / name]
    shards = sorted(folder.glob(f"{glob.escape(subset)}-*.parquet"))
    if shards:
        return shards
    raise DatasetNotFoundError(f"no {subset}.jsonl / {subset}.parquet / {subset}-*.parquet in {folder}")


def _read_rows(folder: Path, subset: str) -> Iterator[dict[str, Any]]:
    for file in rows_file(folder, subset):
        if file.suffix == ".jsonl":
            yield from _read_jsonl(file)
            continue
        try:
            import pyarrow.parquet as pq
        except ImportError as exc:
            raise StreamRankError(f"reading {file} needs pyarrow (pip install pyarrow)") from exc
        for batch in pq.ParquetFile(file).iter_batches():
            yield from batch.to_pylist()


def read_qrels(path: str | Path) -> dict[str, dict[str, int]]:
    """BEIR qrels (``query-id corpus-id score``, header optional) or TREC qrels (``qid 0 docid grade``)."""
    qrels: dict[str, dict[str, int]] = {}
    with Path(path).open(encoding="utf-8") as fh:
        for line in fh:
            parts = line.split()
            if len(parts) == 4:
                parts = [parts[0], parts[2], parts[3]]
            if len(parts) != 3 or not re.fullmatch(r"-?\d+", parts[2]):
                continue  # header or blank line
            qrels.setdefault(parts[0], {})[parts[1]] = int(parts[2])
    return qrels


def _is_json(path: Path) -> bool:
    if path.suffix in {".json", ".jsonl"}:
        return True
    with path.open(encoding="utf-8") as fh:
        head = fh.read(256).lstrip()
    return head[:1] in {"[", "{"}


def _json_entries(path: Path) -> list[dict[str, Any]]:
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return [json.loads(line) for line in text.splitlines() if line.strip()]  # JSON lines
    return data if isinstance(data, list) else [data]


def load_candidates(
    path: str | Path, corpus_lookup: DocumentLookup | None = None
) -> dict[str, list[Candidate]]:
    """Candidate lists per query id from a JSON hits file or a TREC run, best first.

    JSON hits carry their passage text (``content``); a TREC run carries only ids, so documents
    are looked up in ``corpus_lookup`` (a mapping, or a function ``ids -> mapping``) when given.
    """
    path = Path(path)
    if not path.exists():
        raise DatasetNotFoundError(f"candidate file {path} not found")
    pools: dict[str, list[Candidate]] = {}
    if _is_json(path):
        for entry in _json_entries(path):
            query, hits = entry.get("query"), entry.get("hits") or []
            qid = query.get("qid") if isinstance(query, dict) else None
            if qid is None and hits:
                qid = hits[0].get("qid")
            if qid is None:
                continue
            pools[str(qid)] = [
                Candidate(
                    doc_id=str(h["docid"]),
                    score=float(h.get("score", 0.0)),
                    rank=int(h.get("rank", i + 1)),
                    document=Document(id=str(h["docid"]), text=h["content"]) if "content" in h else None,
                )
                for i, h in enumerate(hits)
            ]
    else:
        from streamrank.datasets.trec import read_trec_run

        for qid, rows in read_trec_run(path).items():
            pools[qid] = [Candidate(doc_id=d, score=s, rank=r) for d, r, s in rows]
    if corpus_lookup is not None:
        _attach(pools, corpus_lookup)
    return pools


def _attach(pools: Mapping[str, list[Candidate]], lookup: DocumentLookup) -> None:
    missing = [c.doc_id for pool in pools.values() for c in pool if c.document is None]
    if not missing:
        return
    found = lookup(missing) if callable(lookup) else {i: lookup[i] for i in missing if i in lookup}
    for pool in pools.values():
        for cand in pool:
            if cand.document is None:
                cand.document = found.get(cand.doc_id)


