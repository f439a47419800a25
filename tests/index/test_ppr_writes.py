"""Writes to the corpus graph: appended to a log (O(what they write)), folded in by a refresh, crash-safe."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from ppr_support import make_stage, ppr_stage

from streamrank.context import PipelineContext
from streamrank.index import manifest as mf
from streamrank.index.graph import CorpusGraph, log_path
from streamrank.types import Candidate, Document, Query, Ranking


def _docs(n: int, seed: int, prefix: str) -> list[Document]:
    rng = np.random.default_rng(seed)
    vocab = [f"w{i}" for i in range(60)]
    return [Document(id=f"{prefix}{i}", text=" ".join(rng.choice(vocab, 5))) for i in range(n)]


def _edges(graph: CorpusGraph) -> dict[tuple[str, str], float]:
    coo = graph.knn.tocoo()
    return {(graph.ids[r], graph.ids[c]): float(w) for r, c, w in zip(coo.row, coo.col, coo.data, strict=True)}


def test_incremental_adds_after_a_refresh_match_a_rebuild_within_the_stated_bound(tmp_path: Path) -> None:
    """After adds, a delete and a refresh, the graph differs from a full rebuild only next to the documents
    written: an edge of either graph that the other lacks touches a new document, a document a new one
    is linked to in the rebuild, or a former neighbour of the deleted one; every shared edge has the same weight."""
    base, added = _docs(120, 0, "d"), _docs(15, 1, "n")
    context = PipelineContext(tmp_path / "inc", corpus="toy")
    context.store.upsert(base)
    stage = ppr_stage(context, neighbors=4)
    stage.build(context.store)
    stage._ensure_open()
    before = _edges(stage._solved.graph)
    context.store.upsert(added)
    for doc in added:  # one write each, as the service makes them
        stage.add([doc])
    stage.delete(["d3"])
    assert stage.staleness() == 16
    stage.refresh()
    incremental = _edges(stage._solved.graph)

    context_full = PipelineContext(tmp_path / "full", corpus="toy")
    context_full.store.upsert([d for d in base + added if d.id != "d3"])
    full = ppr_stage(context_full, neighbors=4)
    full.build(context_full.store)
    full._ensure_open()
    rebuilt = _edges(full._solved.graph)

    new_ids = {d.id for d in added}
    near = new_ids | {a for (a, b) in rebuilt if b in new_ids} | {b for (a, b) in before if a == "d3"}
    differ = set(rebuilt) ^ set(incremental)
    assert all(a in near or b in near for a, b in differ)
    shared = set(rebuilt) & set(incremental)
    assert all(incremental[e] == pytest.approx(rebuilt[e]) for e in shared)
    assert len(shared) >= 0.8 * len(rebuilt)
    assert new_ids <= set(stage._solved.graph.row_of) and "d3" not in stage._solved.graph.row_of


def test_a_write_appends_to_the_log_and_never_rewrites_the_graph(tmp_path: Path) -> None:
    stage = make_stage(tmp_path)
    graph_file = stage.folder / "graph.npz"
    before = graph_file.stat().st_mtime_ns
    new = Document(id="a-new", text="membrane protein receptor cell")
    stage.context.store.upsert([new])
    stage.add([new])
    stage.delete(["b1"])
    log = log_path(stage.folder, stage._solved.graph.log)
    assert graph_file.stat().st_mtime_ns == before and log.stat().st_size > 0
    assert mf.read_manifest(stage.folder)["info"]["staleness"] == 2
    stage.refresh()
    assert not log.exists() and graph_file.stat().st_mtime_ns != before  # the log folded into a new graph


def test_refresh_runs_in_the_background_once_staleness_reaches_the_threshold(tmp_path: Path) -> None:
    stage = make_stage(tmp_path, refresh_after=3, expand=3)
    docs = [Document(id=f"a-new{i}", text=f"membrane protein receptor cell extra{i}") for i in range(3)]
    stage.context.store.upsert(docs)
    pool = [Candidate(doc_id="a0", score=1.0, rank=1)]
    for doc in docs:
        stage.add([doc])
        stage.run([Ranking(query=Query(id="q", text="x"), candidates=pool)])  # searches go on meanwhile
    stage.wait_for_refresh()
    assert stage.staleness() == 0 and "a-new2" in stage._solved.graph.row_of


CHILD = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {support!r})
    from ppr_support import ppr_stage
    from streamrank.context import PipelineContext
    from streamrank.types import Document

    context = PipelineContext({index!r}, corpus="toy")
    stage = ppr_stage(context, neighbors=3)
    for i in range({count}):
        doc = Document(id="{prefix}%d" % i, text="membrane protein receptor cell w%d" % i)
        context.store.upsert([doc])
        stage.add([doc])
        print(doc.id, flush=True)
    if {refresh}:
        stage.refresh()
        print("refreshed", flush=True)
    """
)


def _child(index: Path, prefix: str, count: int, point: str = "", refresh: bool = False) -> tuple[int, list[str]]:
    script = CHILD.format(support=str(Path(__file__).parent), index=str(index), count=count, prefix=prefix, refresh=refresh)
    env = {k: v for k, v in os.environ.items() if k != "STREAMRANK_FAULT_POINT"}
    if point:
        env["STREAMRANK_FAULT_POINT"] = point
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env={**env, "OMP_NUM_THREADS": "1"})
    return done.returncode, done.stdout.split()


@pytest.mark.slow
@pytest.mark.parametrize("point", ["append-torn", "graph-refresh-written", "graph-refresh-switched"])
def test_sigkill_during_a_graph_append_or_refresh_loses_no_acknowledged_document(tmp_path: Path, point: str) -> None:
    stage = make_stage(tmp_path)
    index = stage.context.index_dir
    stage.close()
    code, acked = _child(index, "x", 4)
    assert code == 0 and len(acked) == 4
    code, more = _child(index, "y", 3, point=point, refresh=point != "append-torn")
    assert code == -9  # SIGKILLed at the point
    acked += [d for d in more if d != "refreshed"]
    reopened = ppr_stage(PipelineContext(index, corpus="toy"), neighbors=3)
    live = set(reopened.indexed_ids())
    assert set(acked) <= live  # every acknowledged document is in the graph as the crash left it
    if point == "append-torn":
        assert "y0" not in live  # the torn record was never acknowledged: ignored on open
    reopened.context.store.upsert([Document(id="z", text="galaxy star orbit")])
    reopened.add([Document(id="z", text="galaxy star orbit")])  # a later write cuts the torn tail off
    reopened.refresh()
    assert set(acked) | {"z"} <= set(reopened._solved.graph.row_of)
