"""Dataset loading: the real shared BEIR / TREC-DL / classic folders, BRIGHT layout, lookup, downloads."""

from __future__ import annotations

import io
import json
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import pytest

from streamrank import datasets
from streamrank.datasets import corpus_key, load_candidates, load_dataset, read_qrels
from streamrank.errors import DatasetNotFoundError
from streamrank.types import Document


@pytest.fixture
def shared(datasets_root: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    monkeypatch.setenv("STREAMRANK_DATASETS", str(datasets_root))
    monkeypatch.setenv("STREAMRANK_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("STREAMRANK_OFFLINE", "1")
    return datasets_root


@pytest.fixture
def isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No shared data: an empty dataset root and an empty cache."""
    root = tmp_path / "data"
    root.mkdir()
    monkeypatch.setenv("STREAMRANK_DATASETS", str(root))
    monkeypatch.setenv("STREAMRANK_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("STREAMRANK_OFFLINE", "1")
    return root


def write_bright(root: Path, subset: str = "biology", parquet: bool = False) -> Path:
    """A tiny BRIGHT folder in the Hub layout: documents/<subset>, examples/<subset>."""
    docs = [
        {"id": "d1", "content": "ocean water"},
        {"id": "d2", "content": "tide pools"},
        {"id": "d3", "content": "x"},
    ]
    examples = [
        {
            "id": "0",
            "query": "why is the sea salty",
            "gold_ids": ["d1"],
            "excluded_ids": ["d3"],
            "reasoning": "",
        },
        {
            "id": "1",
            "query": "what are tides",
            "gold_ids": ["d2", "d1"],
            "excluded_ids": ["N/A"],
            "reasoning": "",
        },
    ]
    folder = root / "bright"
    for name, rows in (("documents", docs), ("examples", examples)):
        (folder / name).mkdir(parents=True, exist_ok=True)
        if parquet:
            import pyarrow as pa
            import pyarrow.parquet as pq

            pq.write_table(pa.Table.from_pylist(rows), folder / name / f"{subset}-00000-of-00001.parquet")
        else:
            (folder / name / f"{subset}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def test_scifact_counts_and_order(shared: Path) -> None:
    data = load_dataset("scifact")
    assert data.kind == "beir" and data.name == "scifact" and data.has_corpus
    assert sum(1 for _ in data.corpus()) == 5183
    assert data.splits() == ["test", "train"]
    queries = data.queries("test")
    assert len(queries) == 300 and len(data.queries("train")) == 809
    qrels = data.qrels("test")
    assert len(qrels) == 300 and sum(len(v) for v in qrels.values()) == 339
    file_order = [json.loads(line)["_id"] for line in (data.path / "queries.jsonl").open()]
    assert [q.id for q in queries] == [qid for qid in file_order if qid in qrels]
    assert data.candidates() is None and data.excluded_ids() == {} and data.rel_level == 1
    doc = next(data.corpus())
    assert doc.title and doc.text and data.documents([doc.id, "nope"]) == {doc.id: doc}


def test_dl19_is_reranking_form(shared: Path) -> None:
    data = load_dataset("dl19-passage")
    assert data.kind == "rerank" and not data.has_corpus and data.rel_level == 2
    queries = data.queries("test")
    assert len(queries) == 43
    pools = data.candidates("test")
    assert pools is not None and set(pools) == {q.id for q in queries}
    assert all(len(pool) == 100 for pool in pools.values())
    first = pools[queries[0].id][0]
    assert first.rank == 1 and first.document is not None and first.document.text
    with pytest.raises(DatasetNotFoundError, match="reranking set.*bm25_top100.json"):
        data.corpus()
    # The TREC run carries the same lists; passage text comes from the JSON files.
    trec = data.candidates("test", source="bm25_top100.trec")
    assert trec is not None
    assert [c.doc_id for c in trec[queries[0].id]] == [c.doc_id for c in pools[queries[0].id]]
    assert trec[queries[0].id][0].document == first.document


def test_classic_collections_nested_lookup(shared: Path) -> None:
    cranfield = load_dataset("cranfield")
    assert cranfield.path == shared / "classic" / "cranfield"
    assert sum(1 for _ in cranfield.corpus()) == 1400 and len(cranfield.queries("test")) == 225
    cisi = load_dataset("classic/cisi")
    assert sum(1 for _ in cisi.corpus()) == 1460 and len(cisi.queries("test")) == 76
    assert load_dataset("beir/scifact").path == load_dataset(str(shared / "beir" / "scifact")).path


def test_unknown_split_names_the_available_ones(shared: Path) -> None:
    with pytest.raises(DatasetNotFoundError, match=r"no split 'dev' \(available: test, train\)"):
        load_dataset("scifact").queries("dev")


def test_missing_dataset_lists_every_place_looked(isolated: Path) -> None:
    started = time.perf_counter()
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset("nfcorpus")
    message = str(info.value)
    assert time.perf_counter() - started < 2.0
    assert str(isolated / "nfcorpus") in message
    assert str(datasets.cache_dir() / "nfcorpus") in message
    assert "STREAMRANK_OFFLINE" in message and "set STREAMRANK_DATASETS" in message
    with pytest.raises(DatasetNotFoundError, match="neither a BEIR name"):
        load_dataset("no-such-set")


def test_failed_download_is_reported_fast(isolated: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("STREAMRANK_OFFLINE")
    seen: list[float] = []

    def refuse(url: str, timeout: float) -> None:
        seen.append(timeout)
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    with pytest.raises(DatasetNotFoundError, match=r"download: failed \(URLError"):
        load_dataset("scifact")
    assert seen and seen[0] <= 30, "the download attempt has a short timeout"


class FakeResponse(io.BytesIO):
    headers = {"Content-Length": "0"}


def test_beir_download_lands_in_cache(isolated: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("STREAMRANK_OFFLINE")
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("scifact/corpus.jsonl", json.dumps({"_id": "d", "title": "T", "text": "x"}) + "\n")
        zf.writestr("scifact/queries.jsonl", json.dumps({"_id": "q", "text": "x?"}) + "\n")
        zf.writestr("scifact/qrels/test.tsv", "query-id\tcorpus-id\tscore\nq\td\t1\n")
    urls: list[str] = []

    def serve(url: str, timeout: float) -> FakeResponse:
        urls.append(url)
        return FakeResponse(archive.getvalue())

    monkeypatch.setattr(urllib.request, "urlopen", serve)
    data = load_dataset("scifact")
    assert urls == [datasets.BEIR_URL.format(name="scifact")]
    assert data.path == datasets.cache_dir() / "beir" / "scifact"
    assert [q.text for q in data.queries("test")] == ["x?"]
    load_dataset("scifact")
    assert len(urls) == 1, "the second load finds the cached copy"


@pytest.mark.parametrize("parquet", [False, True])
def test_bright_local_folder(isolated: Path, parquet: bool) -> None:
    write_bright(isolated, parquet=parquet)
    data = load_dataset("bright/biology")
    assert data.kind == "bright" and data.name == "bright/biology" and data.splits() == ["test"]
    assert [d.id for d in data.corpus()] == ["d1", "d2", "d3"]
    assert [(q.id, q.text) for q in data.queries()] == [
        ("0", "why is the sea salty"),
        ("1", "what are tides"),
    ]
    assert data.qrels() == {"0": {"d1": 1}, "1": {"d2": 1, "d1": 1}}
    assert data.excluded_ids() == {"0": {"d3"}}, "'N/A' is not an id"
    assert load_dataset(isolated / "bright" / "biology").name == "bright/biology"
    with pytest.raises(DatasetNotFoundError, match="unknown BRIGHT subset"):
        load_dataset("bright/zoology")


def test_corpus_key(tmp_path: Path) -> None:
    assert corpus_key("scifact") == "scifact" == corpus_key("beir/scifact")
    assert corpus_key("bright/biology") == "bright-biology"
    folder = tmp_path / "my set"
    folder.mkdir()
    key = corpus_key(folder)
    assert key.startswith("my_set-") and len(key) == len("my_set-") + 8
    assert corpus_key(str(folder)) == key != corpus_key(tmp_path / "other" / "my set")


def test_load_candidates_json_and_trec(tmp_path: Path) -> None:
    hits = [
        {
            "query": {"text": "q one", "qid": "1"},
            "hits": [{"qid": "1", "docid": "a", "rank": 1, "score": 2.0, "content": "A"}],
        },
        {"query": "q two", "hits": [{"qid": 2, "docid": "b", "rank": 1, "score": 1.5, "content": "B"}]},
    ]
    path = tmp_path / "cands.json"
    path.write_text(json.dumps(hits))
    pools = load_candidates(path)
    assert list(pools) == ["1", "2"]
    assert pools["2"][0].doc_id == "b" and pools["2"][0].score == 1.5 and pools["2"][0].document.text == "B"

    run = tmp_path / "run.txt"
    run.write_text("7 Q0 y 2 1.0 t\n7 Q0 x 1 3.0 t\n8 Q0 z 1 0.5 t\n")
    known = {"x": Document("x", "ex"), "y": Document("y", "why")}
    pools = load_candidates(run, corpus_lookup=known)
    assert [c.doc_id for c in pools["7"]] == ["x", "y"] and pools["7"][1].rank == 2
    assert pools["7"][0].document.text == "ex" and pools["8"][0].document is None
    asked: list[list[str]] = []
    load_candidates(run, corpus_lookup=lambda ids: asked.append(list(ids)) or {})
    assert asked == [["x", "y", "z"]]
    with pytest.raises(DatasetNotFoundError, match="not found"):
        load_candidates(tmp_path / "missing.json")


def test_read_qrels_beir_and_trec_forms(tmp_path: Path) -> None:
    beir = tmp_path / "a.tsv"
    beir.write_text("query-id\tcorpus-id\tscore\nq1\td1\t2\nq1\td2\t0\n")
    trec = tmp_path / "b.txt"
    trec.write_text("q1 0 d1 2\nq1 0 d2 0\n")
    assert read_qrels(beir) == read_qrels(trec) == {"q1": {"d1": 2, "d2": 0}}
