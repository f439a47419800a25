"""Benchmark datasets: BEIR folders, reranking sets with given candidates (TREC-DL) and BRIGHT.

``load_dataset(ref)`` looks, in this order:

1. ``ref`` as a local folder (a BEIR-layout folder, or ``<BRIGHT folder>/<subset>``);
2. ``ref`` as a name under each folder of ``$STREAMRANK_DATASETS`` (``os.pathsep``-separated), up to
   two folder levels down: ``scifact`` finds ``<root>/beir/scifact``, ``cranfield`` finds
   ``<root>/classic/cranfield``, ``beir/scifact`` works too;
3. the same under the download cache ``$STREAMRANK_HOME/datasets``;
4. a download into that cache, unless ``STREAMRANK_OFFLINE=1``: BEIR names from the official BEIR
   URL, ``bright/<subset>`` through Hugging Face ``datasets`` (``xlangai/BRIGHT``).

Layouts read:

- BEIR: ``corpus.jsonl`` (``_id``, ``title``, ``text``), ``queries.jsonl`` (``_id``, ``text``),
  ``qrels/<split>.tsv`` (header ``query-id corpus-id score``; 4-column TREC qrels also accepted).
- Reranking form: the same without ``corpus.jsonl``, plus candidate lists (``bm25_top100.json``:
  ``[{"query": text | {"text", "qid"}, "hits": [{"qid", "docid", "rank", "score", "content"}]}]``,
  or a TREC run such as ``bm25_top100.trec``).
- BRIGHT: a folder named ``bright`` holding ``documents/<subset>`` (``id``, ``content``) and
  ``examples/<subset>`` (``id``, ``query``, ``gold_ids``, ``excluded_ids``) as ``.jsonl``,
  ``.parquet`` or the Hub's ``<subset>-00000-of-00001.parquet``; referred to as ``bright/<subset>``.
  One split, ``test``; every gold id has relevance 1; ``excluded_ids`` are dropped before scoring.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import shutil
import tempfile
import zipfile
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

from streamrank.errors import DatasetNotFoundError, StreamRankError
from streamrank.types import Candidate, Document, Query

BEIR_URL = "https://public.ukp.informatik.tu-darmstadt.de/thakur/BEIR/datasets/{name}.zip"
BEIR_NAMES = frozenset(
    {
        "msmarco", "trec-covid", "nfcorpus", "nq", "hotpotqa", "fiqa", "arguana", "webis-touche2020",
        "cqadupstack", "quora", "dbpedia-entity", "scidocs", "fever", "climate-fever", "scifact",
    }
)  # fmt: skip
BRIGHT_HF_ID = "xlangai/BRIGHT"
BRIGHT_SUBSETS = frozenset(
    {
        "biology", "earth_science", "economics", "psychology", "robotics", "stackoverflow",
        "sustainable_living", "leetcode", "pony", "aops", "theoremqa_questions", "theoremqa_theorems",
    }
)  # fmt: skip
DEFAULT_CANDIDATE_FILES = ("bm25_top100.json", "bm25_top100.trec")
DOWNLOAD_TIMEOUT_S = 10.0
SEARCH_DEPTH = 2
"""How many folder levels below a dataset root a name is looked for."""

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

    def _check_split(self, split: str) -> None:
        if split not in self.splits():
            raise DatasetNotFoundError(
                f"dataset {self.name!r} has no split {split!r} (available: {', '.join(self.splits()) or 'none'})"
            )

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, kind={self.kind!r}, path={str(self.path)!r})"


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
        rows = _read_jsonl(self.path / "corpus.jsonl")
        return (
            Document(id=str(r["_id"]), text=r.get("text") or "", title=r.get("title") or "") for r in rows
        )

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
        return [_rows_file(self.path / "documents", self.subset)[0]]


# ---- files --------------------------------------------------------------------------------------
def _read_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                yield json.loads(line)


def _rows_file(folder: Path, subset: str) -> list[Path]:
    """The file(s) holding ``subset`` in a BRIGHT folder: jsonl, parquet, or Hub-style parquet shards."""
    for name in (f"{subset}.jsonl", f"{subset}.parquet"):
        if (folder / name).exists():
            return [folder / name]
    shards = sorted(folder.glob(f"{glob.escape(subset)}-*.parquet"))
    if shards:
        return shards
    raise DatasetNotFoundError(f"no {subset}.jsonl / {subset}.parquet / {subset}-*.parquet in {folder}")


def _read_rows(folder: Path, subset: str) -> Iterator[dict[str, Any]]:
    for file in _rows_file(folder, subset):
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
        from streamrank.eval.trec import read_trec_run

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


# ---- resolution ---------------------------------------------------------------------------------
def dataset_roots() -> list[Path]:
    """Folders searched by name: each entry of $STREAMRANK_DATASETS, then the download cache."""
    env = os.environ.get("STREAMRANK_DATASETS", "")
    return [Path(p).expanduser() for p in env.split(os.pathsep) if p] + [cache_dir()]


def cache_dir() -> Path:
    from streamrank.models import cache_home

    return cache_home() / "datasets"


def offline() -> bool:
    return os.environ.get("STREAMRANK_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def _is_beir_dir(path: Path) -> bool:
    return (path / "queries.jsonl").is_file() and (path / "qrels").is_dir()


def _is_bright_dir(path: Path) -> bool:
    return (path / "documents").is_dir() and (path / "examples").is_dir()


def _open_at(path: Path) -> Dataset | None:
    """The dataset at ``path`` (a BEIR folder or ``<BRIGHT folder>/<subset>``), or None."""
    if path.is_dir() and _is_beir_dir(path):
        return BeirDataset(path.name, path)
    if _is_bright_dir(path.parent):
        try:
            _rows_file(path.parent / "documents", path.name)
        except DatasetNotFoundError:
            return None
        return BrightDataset(path.parent, path.name)
    return None


def _find_under(root: Path, ref: str) -> Dataset | None:
    ref = ref.strip("/")
    parent, _, leaf = ref.rpartition("/")
    for depth in range(SEARCH_DEPTH + 1):
        prefix = "*/" * depth
        paths = sorted(root.glob(prefix + glob.escape(ref)))
        if parent:  # a BRIGHT subset is not a folder of its own: <bright folder>/<subset>
            paths += [p / leaf for p in sorted(root.glob(prefix + glob.escape(parent)))]
        for path in paths:
            found = _open_at(path)
            if found is not None:
                return found
    return None


def load_dataset(ref: str | Path) -> Dataset:
    """Resolve ``ref`` (a folder, or a name such as ``scifact``, ``dl19-passage``, ``bright/biology``)."""
    ref = str(ref)
    local = Path(ref).expanduser()
    found = _open_at(local)
    if found is not None:
        return found
    looked = [f"the path {local.absolute()}"]
    for root in dataset_roots():
        looked.append(f"{root}/{ref} (and up to {SEARCH_DEPTH} folder levels deeper)")
        found = _find_under(root, ref) if root.is_dir() else None
        if found is not None:
            return found
    attempt = _download(ref)
    if attempt is None:
        found = _find_under(cache_dir(), ref)
        if found is not None:
            return found
    looked.append(f"download: {attempt or 'done, but the result is not a dataset folder'}")
    raise DatasetNotFoundError(
        f"dataset {ref!r} not found. Looked in:\n  - "
        + "\n  - ".join(looked)
        + "\nFix: set STREAMRANK_DATASETS to the folder(s) holding your datasets (os.pathsep-separated; "
        "BEIR layout: corpus.jsonl, queries.jsonl, qrels/<split>.tsv), or pass a dataset folder path."
    )


def corpus_key(ref: str | Path) -> str:
    """A stable, short folder name for a dataset reference (where its indexes live).

    A name stays the name (``scifact``; ``bright/biology`` -> ``bright-biology``; ``beir/scifact`` ->
    ``scifact``); a path becomes its folder name plus a short hash of the resolved path.
    """
    ref = str(ref)
    path = Path(ref).expanduser()
    if path.exists() or path.is_absolute() or ref.startswith((".", "~")):
        resolved = path.resolve()
        return f"{slug(resolved.name)}-{hashlib.sha1(str(resolved).encode()).hexdigest()[:8]}"
    name = ref.strip("/").lower()
    name = name.removeprefix("beir/")
    return slug(name.replace("/", "-"))


def slug(text: str) -> str:
    """A file-name-safe form of ``text``."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._") or "dataset"


# ---- downloads ----------------------------------------------------------------------------------
def _download(ref: str) -> str | None:
    """Fetch a known dataset into the cache. None on success, else why nothing was fetched."""
    name = ref.strip("/").removeprefix("beir/")
    subset = name.removeprefix("bright/") if name.startswith("bright/") else None
    if subset is None and name not in BEIR_NAMES:
        return f"skipped ({ref!r} is neither a BEIR name nor bright/<subset>)"
    if subset is not None and subset not in BRIGHT_SUBSETS:
        return f"skipped (unknown BRIGHT subset {subset!r}; known: {', '.join(sorted(BRIGHT_SUBSETS))})"
    if offline():
        return "skipped (STREAMRANK_OFFLINE is set)"
    try:
        if subset is not None:
            _download_bright(subset, cache_dir() / "bright")
        else:
            _download_beir(name, cache_dir() / "beir")
    except Exception as exc:  # noqa: BLE001 - any network/HF failure is reported, not raised
        return f"failed ({type(exc).__name__}: {exc})"
    return None


def _download_beir(name: str, target: Path) -> None:
    import urllib.request

    from tqdm import tqdm

    url = BEIR_URL.format(name=name)
    target.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target) as tmp:
        archive = Path(tmp) / f"{name}.zip"
        with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response, archive.open("wb") as out:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"downloading {name}") as bar:
                for block in iter(lambda: response.read(1 << 20), b""):
                    out.write(block)
                    bar.update(len(block))
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(tmp)
        extracted = Path(tmp) / name
        if not extracted.is_dir():
            raise DatasetNotFoundError(f"{url} did not contain a {name}/ folder")
        shutil.move(str(extracted), target / name)


def _download_bright(subset: str, target: Path) -> None:
    if os.environ.get("HF_HUB_OFFLINE", "").strip() in {"1", "true", "yes"}:
        raise DatasetNotFoundError("HF_HUB_OFFLINE is set")
    try:
        import datasets as hf_datasets
    except ImportError as exc:
        raise DatasetNotFoundError("Hugging Face `datasets` is not installed (pip install datasets)") from exc
    for config in ("documents", "examples"):
        rows = hf_datasets.load_dataset(BRIGHT_HF_ID, config, split=subset)
        _write_jsonl(target / config / f"{subset}.jsonl", rows)


def _write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    with partial.open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    partial.replace(path)
