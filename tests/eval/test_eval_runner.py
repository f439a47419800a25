"""The eval runner end to end with a tiny test stage: outputs, reranking form, BRIGHT exclusions,
comparison chart, the reproducibility check and the CLI."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path

import pytest

from streamrank import cli
from streamrank import compose as registry
from streamrank.errors import StreamRankError
from streamrank.eval.runner import check_reproducibility, load_table, run_eval
from streamrank.stage import BaseStage
from streamrank.types import Candidate, Document, ModelCall, Ranking

METRICS_KEYS = {
    "dataset", "pipeline", "split", "queries", "top", "metrics", "latency_ms", "stages",
    "index_seconds", "eval_seconds", "model_calls",
}  # fmt: skip


class WordHits(BaseStage):
    """Test retriever: score = how many times the query's words occur in the document.

    Without candidates it scores every stored document; its "index" is a marker file, built once.
    """

    builds = 0

    def build(self, documents: Iterable[Document], *, rebuild: bool = False) -> None:
        marker = self.context.require_index_dir("wordhits") / "wordhits.done"
        if marker.exists() and not rebuild:
            return
        type(self).builds += 1
        marker.write_text("built")

    def run(self, rankings: Sequence[Ranking]) -> list[Ranking]:
        out = []
        for ranking in rankings:
            pool = ranking.candidates or [Candidate(d.id, 0.0, document=d) for d in self.context.store]
            words = ranking.query.text.lower().split()
            scores = [sum(c.document.contents.lower().split().count(w) for w in words) for c in pool]
            ranked = ranking.rescored(self.name, scores, keep=self.config.k, candidates=pool)
            ranked.calls.append(ModelCall(self.name, "wordhits", prompt_tokens=len(pool), output_tokens=1))
            out.append(ranked)
        return out


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    monkeypatch.setitem(registry.STAGE_KINDS, "wordhits", f"{__name__}:WordHits")
    monkeypatch.setenv("STREAMRANK_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("STREAMRANK_DATASETS", str(tmp_path / "data"))
    monkeypatch.setenv("STREAMRANK_OFFLINE", "1")
    WordHits.builds = 0
    return tmp_path


def write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


DOCS = {
    "d1": "apple fruit sweet",
    "d2": "apple pie",
    "d3": "car engine oil",
    "d4": "ocean water salt",
    "d5": "fresh water lake",
    "d6": "engine noise",
}
QUERIES = {"q1": "apple fruit", "q2": "car engine", "q3": "ocean water", "q4": "unjudged query"}
QRELS = [("q1", "d1", 2), ("q1", "d2", 1), ("q2", "d3", 1), ("q3", "d5", 1)]


def write_beir(root: Path, with_corpus: bool = True) -> Path:
    folder = root / "toy"
    if with_corpus:
        write_jsonl(folder / "corpus.jsonl", ({"_id": i, "title": "", "text": t} for i, t in DOCS.items()))
    write_jsonl(folder / "queries.jsonl", ({"_id": i, "text": t} for i, t in QUERIES.items()))
    (folder / "qrels").mkdir(parents=True, exist_ok=True)
    (folder / "qrels" / "test.tsv").write_text(
        "query-id\tcorpus-id\tscore\n" + "".join(f"{q}\t{d}\t{s}\n" for q, d, s in QRELS)
    )
    return folder


def write_pipeline(root: Path, name: str = "toy-pipe") -> Path:
    path = root / f"{name}.toml"
    # The file names another corpus: the eval's dataset must override it.
    path.write_text(f'name = "{name}"\ncorpus = "elsewhere"\n[[stages]]\nkind = "wordhits"\nk = 1000\n')
    return path


def test_retrieval_eval_writes_all_outputs(env: Path) -> None:
    dataset = write_beir(env / "data")
    out = env / "out"
    result = run_eval("toy", write_pipeline(env), out, batch_size=2)
    saved = json.loads((out / "metrics.json").read_text())
    assert saved == result and set(saved) == METRICS_KEYS
    assert saved["dataset"] == "toy" and saved["pipeline"] == "toy-pipe" and saved["queries"] == 3
    assert set(saved["metrics"]) == {"nDCG@10", "R@100", "R@1000", "RR@10", "AP"}
    # q1 and q2 rank their relevant documents first; q3's relevant d5 comes second after d4.
    q3 = 1 / math.log2(3)  # nDCG of the one relevant document at rank 2
    assert saved["metrics"]["nDCG@10"] == pytest.approx((1 + 1 + q3) / 3)
    assert saved["metrics"]["RR@10"] == pytest.approx((1 + 1 + 0.5) / 3)
    assert (
        set(saved["latency_ms"]) == {"p50", "p95"}
        and saved["latency_ms"]["p95"] >= saved["latency_ms"]["p50"] > 0
    )
    assert set(saved["stages"]) == {"wordhits"} and saved["stages"]["wordhits"]["mean_ms"] >= 0
    assert saved["model_calls"] == {"count": 3, "prompt_tokens": 18, "output_tokens": 1 * 3}
    lines = [line.split() for line in (out / "run.trec").read_text().splitlines()]
    assert all(len(parts) == 6 and parts[1] == "Q0" and parts[5] == "toy-pipe" for parts in lines)
    assert [p[2] for p in lines if p[0] == "q3"][:2] == ["d4", "d5"] and len(lines) == 3 * 6, (
        "whole final list"
    )
    report = (out / "report.md").read_text()
    assert "| nDCG@10 |" in report and "toy-pipe on toy" in report and "Comparison" not in report
    assert set(json.loads((out / "per_query.json").read_text())) == {"q1", "q2", "q3"}
    # The index lives under $STREAMRANK_HOME/indexes/<corpus key> and is built once.
    assert (env / "home" / "indexes" / "toy" / "wordhits.done").exists() and WordHits.builds == 1
    again = run_eval(str(dataset), write_pipeline(env), env / "out2", limit=2)
    assert again["queries"] == 2 and WordHits.builds == 2, "a path ref is a different corpus key"
    run_eval("toy", write_pipeline(env), env / "out3", limit=1)
    assert WordHits.builds == 2, "the second eval over the same corpus reuses its index"


def test_eval_top_ranks_as_requests_do(env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_beir(env / "data")
    full = run_eval("toy", write_pipeline(env), env / "full")
    served = run_eval("toy", write_pipeline(env), env / "top2", top=2)
    assert full["top"] is None and served["top"] == 2
    lines = [line.split() for line in (env / "top2" / "run.trec").read_text().splitlines()]
    assert len(lines) == 3 * 2  # only the answer a request for the best 2 gets
    assert served["metrics"] == full["metrics"]  # every relevant document is in each query's top 2
    first = run_eval("toy", write_pipeline(env), env / "top1", top=1)
    assert first["metrics"]["R@100"] == pytest.approx((1 / 2 + 1 + 0) / 3)  # q1's d2 and q3's d5 are 2nd
    with pytest.raises(StreamRankError, match="--top must be at least 1"):
        run_eval("toy", write_pipeline(env), env / "bad", top=0)
    argv = ["eval", "-d", "toy", "-p", str(write_pipeline(env)), "-o", str(env / "cli-top"), "--top", "1"]
    assert cli.main(argv) == 0 and json.loads((env / "cli-top" / "metrics.json").read_text())["top"] == 1
    capsys.readouterr()


def test_reranking_form_uses_the_dataset_candidates_and_no_corpus(env: Path) -> None:
    folder = write_beir(env / "data", with_corpus=False)
    pools = [
        {"query": QUERIES["q1"], "hits": [{"qid": "q1", "docid": d, "rank": i + 1, "score": 1.0 / (i + 1), "content": DOCS[d]}
                                    for i, d in enumerate(["d6", "d2", "d1"])]},
        {"query": {"qid": "q2", "text": QUERIES["q2"]}, "hits": [{"qid": "q2", "docid": "d3", "rank": 1, "score": 0, "content": DOCS["d3"]}]},
    ]  # fmt: skip
    (folder / "bm25_top100.json").write_text(json.dumps(pools))
    result = run_eval("toy", write_pipeline(env), env / "out")
    assert result["queries"] == 3, "q3 has no candidates: it is evaluated with an empty ranking"
    run = (env / "out" / "run.trec").read_text().split("\n")
    assert [line.split()[2] for line in run if line.startswith("q1 ")] == ["d1", "d2", "d6"]
    assert not (env / "home" / "indexes").exists(), "a reranking set builds no index, whatever the file names"
    assert result["metrics"]["RR@10"] == pytest.approx(2 / 3)


def test_candidates_file_docs_come_from_the_corpus(env: Path) -> None:
    write_beir(env / "data")
    trec = env / "cands.trec"
    trec.write_text("q1 Q0 d2 1 5.0 bm25\nq1 Q0 d1 2 4.0 bm25\nq3 Q0 d5 1 1.0 bm25\n")
    result = run_eval("toy", write_pipeline(env), env / "out", candidates=trec)
    run = [line.split() for line in (env / "out" / "run.trec").read_text().splitlines()]
    assert [(p[0], p[2]) for p in run] == [("q1", "d1"), ("q1", "d2"), ("q3", "d5")]
    assert result["metrics"]["nDCG@10"] == pytest.approx(2 / 3)


def test_bright_excluded_ids_are_removed_before_scoring(env: Path) -> None:
    bright = env / "data" / "bright"
    docs = [{"id": "dup", "content": "ocean ocean water water"}, {"id": "gold", "content": "ocean water"}]
    examples = [{"id": "0", "query": "ocean water", "gold_ids": ["gold"], "excluded_ids": ["dup"]}]
    write_jsonl(bright / "documents" / "pony.jsonl", docs)
    write_jsonl(bright / "examples" / "pony.jsonl", examples)
    result = run_eval("bright/pony", write_pipeline(env), env / "out")
    assert result["dataset"] == "bright/pony"
    assert (env / "out" / "run.trec").read_text().split()[2] == "gold"
    assert "dup" not in (env / "out" / "run.trec").read_text()
    assert result["metrics"]["nDCG@10"] == pytest.approx(1.0)


def test_compare_draws_a_chart(env: Path) -> None:
    write_beir(env / "data")
    run_eval("toy", write_pipeline(env, "first"), env / "a")
    run_eval("toy", write_pipeline(env, "second"), env / "b", limit=2, compare=[env / "a"])
    png = (env / "b" / "comparison.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000
    report = (env / "b" / "report.md").read_text()
    assert "## Comparison" in report and "| first (a) | toy | 3 |" in report and "comparison.png" in report
    with pytest.raises(StreamRankError, match="no metrics.json"):
        run_eval("toy", write_pipeline(env), env / "c", compare=[env / "nothing"])


def write_table(env: Path, rows: str) -> Path:
    path = env / "table.toml"
    path.write_text(rows)
    return path


def test_reproducibility_check(env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_beir(env / "data")
    write_pipeline(env)  # table paths are relative to the table's folder
    exact = run_eval("toy", env / "toy-pipe.toml", env / "ref", limit=2)["metrics"]["nDCG@10"]
    good = f'[[row]]\ndataset = "toy"\npipeline = "toy-pipe.toml"\nlimit = 2\nexpected = {exact}\ntolerance = 0.001\n'
    off = '[[row]]\ndataset = "toy"\npipeline = "toy-pipe.toml"\nmeasure = "RR@10"\nexpected = 0.1\ntolerance = 0.01\n'
    assert check_reproducibility(write_table(env, good)) == 0
    printed = capsys.readouterr().out
    assert "OK" in printed and "1/1 rows reproduced" in printed
    assert check_reproducibility(write_table(env, good + off), output=env / "repro") == 1
    printed = capsys.readouterr().out
    assert "FAIL" in printed and "1/2 rows reproduced" in printed
    summary = json.loads((env / "repro" / "reproducibility.json").read_text())
    assert [r["status"] for r in summary] == ["OK", "FAIL"] and summary[1]["got"] == pytest.approx(2.5 / 3)
    assert (env / "repro" / "00-toy-toy-pipe" / "metrics.json").exists()
    unset = '[[row]]\ndataset = "toy"\npipeline = "toy-pipe.toml"\n'
    assert check_reproducibility(write_table(env, unset)) == 1 and "UNSET" in capsys.readouterr().out
    write_pipeline(env, "other")
    missing = '[[row]]\ndataset = "nope"\npipeline = "other.toml"\nexpected = 0.5\n'
    assert check_reproducibility(write_table(env, missing + good), only="toy") == 0, "only filters rows"
    assert check_reproducibility(write_table(env, missing)) == 1 and "ERROR" in capsys.readouterr().out
    with pytest.raises(StreamRankError, match="no reproducibility rows match"):
        check_reproducibility(write_table(env, good), only="zzz")


def test_packaged_table_parses() -> None:
    rows = load_table()
    assert {(r.dataset, Path(r.pipeline).name) for r in rows} >= {
        ("scifact", "bm25"), ("scifact", "dense"), ("scifact", "hybrid"), ("dl19-passage", "dense"),
        ("cranfield", "bm25"), ("cisi", "bm25"),
    }  # fmt: skip
    assert all(r.expected is not None or "PLACEHOLDER" in r.note for r in rows)
    from streamrank.config import read_config

    for row in rows:  # every row names a pipeline file that exists and validates
        read_config(row.pipeline)


def test_cli_eval_and_check(env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_beir(env / "data")
    pipe = write_pipeline(env)
    argv = ["eval", "-d", "toy", "-p", str(pipe), "-o", str(env / "cli"), "--limit", "2", "--batch-size", "2"]
    assert cli.main(argv) == 0
    assert json.loads(capsys.readouterr().out)["nDCG@10"] == pytest.approx(1.0)
    table = write_table(env, f'[[row]]\ndataset = "toy"\npipeline = "{pipe.name}"\nexpected = 0.0\n')
    assert cli.main(["eval", "--check", "--table", str(table), "--limit", "1"]) == 1
    assert cli.main(["eval", "-d", "nope", "-p", str(pipe), "-o", str(env / "x")]) == 2
    assert "not found" in capsys.readouterr().err
