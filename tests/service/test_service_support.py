"""Fake stages and server helpers for the service tests (no models, no JVM); a server subprocess imports it too.

``FakeRetriever`` keeps a word-overlap index in ``<index_dir>/fake/index.json``. It writes the file
only on ``build`` and ``close``, never on ``add``: a server killed with SIGKILL loses every add since
start, which is exactly what startup recovery (``Pipeline.recover`` via ``indexed_ids``) must repair.
It refuses a document whose text contains REFUSED (a ValueError, as an index rejecting a document)
and fails on one containing DISK_FULL (ENOSPC, as a full disk).
"""

from __future__ import annotations

import errno
import json
import os
import re
import threading
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

from streamrank.eval.bench.service_load import ServiceProcess, wait_ready
from streamrank.stage import BaseStage, StageConfig
from streamrank.types import Candidate, Document, Ranking

REFUSED = "REFUSE-ME"
DISK_FULL = "FILL-THE-DISK"

FAKE_KINDS = {
    "fake_retriever": "test_service_support:FakeRetriever",
    "slow_reranker": "test_service_support:SlowReranker",
}

CORPUS = [
    Document(id="d1", title="Vitamin D", text="Vitamin D supplements and bone fractures in older adults."),
    Document(id="d2", title="Sleep", text="Sleep deprivation impairs memory consolidation."),
    Document(id="d3", title="Coffee", text="Coffee consumption and the risk of heart disease."),
    Document(id="d4", title="Exercise", text="Exercise improves memory and mood in older adults."),
    Document(id="d5", title="Bones", text="Calcium intake, vitamin K and bone density."),
]

PIPELINE_TOML = """\
name = "{name}"
description = "fake retriever{extra_desc}"

[[stages]]
kind = "fake_retriever"
k = 100
delay_s = {delay}
add_delay_s = {add_delay}
{extra}"""

SLOW_STAGE = """
[[stages]]
kind = "slow_reranker"
delay_s = {delay}
"""


def words(text: str) -> set[str]:
    return set(re.findall(r"[a-z0-9]+", text.lower()))


class FakeRetrieverConfig(StageConfig):
    delay_s: float = 0.0
    """Sleep per call (not per query): makes concurrent requests pile up so batching is visible."""
    add_delay_s: float = 0.0
    """Sleep per ``add``: keeps document writes in flight (shutdown tests)."""


class FakeRetriever(BaseStage):
    """Scores documents by how many query words they contain."""

    Config = FakeRetrieverConfig

    def __init__(self, config: FakeRetrieverConfig, context) -> None:
        super().__init__(config, context)
        self.path = Path(context.require_index_dir("fake")) / "fake" / "index.json"
        self.docs: dict[str, str] = json.loads(self.path.read_text()) if self.path.exists() else {}
        self.batches: list[int] = []

    def run(self, rankings: Sequence[Ranking]) -> list[Ranking]:
        time.sleep(self.config.delay_s)
        self.batches.append(len(rankings))
        out = []
        for r in rankings:
            q = words(r.query.text)
            pool = r.candidates or [Candidate(doc_id=i, score=0.0) for i in sorted(self.docs)]
            scores = {c.doc_id: float(len(q & words(self._text(c)))) for c in pool}
            if not r.candidates:  # searching the index: only documents that share a word
                scores = {i: s for i, s in scores.items() if s > 0}
            out.append(r.rescored(self.name, scores, keep=self.config.k, candidates=pool))
        return out

    def _text(self, candidate: Candidate) -> str:
        return candidate.document.contents if candidate.document else self.docs.get(candidate.doc_id, "")

    def build(self, documents: Iterable[Document], *, rebuild: bool = False) -> None:
        self.docs = {d.id: d.contents for d in documents}
        self._save()

    def add(self, documents: Sequence[Document]) -> None:
        time.sleep(self.config.add_delay_s)
        for d in documents:  # like Lucene, a refused document does not stop the ones before it
            if REFUSED in d.text:
                raise ValueError(f"the fake index refuses documents containing {REFUSED}")
            if DISK_FULL in d.text:
                raise OSError(errno.ENOSPC, "No space left on device", str(self.path))
            self.docs[d.id] = d.contents

    def delete(self, doc_ids: Sequence[str]) -> None:
        for i in doc_ids:
            self.docs.pop(i, None)

    def indexed_ids(self) -> list[str]:
        return list(self.docs)

    def close(self) -> None:
        self._save()

    def _save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.docs))
        tmp.replace(self.path)


class SlowRerankerConfig(StageConfig):
    delay_s: float = 1.0


class SlowReranker(BaseStage):
    """Reverses the order it is given, after sleeping: a stand-in for an expensive LLM reranker."""

    Config = SlowRerankerConfig

    def run(self, rankings: Sequence[Ranking]) -> list[Ranking]:
        time.sleep(self.config.delay_s)
        return [r.rescored(self.name, [float(c.rank) for c in r.candidates]) for r in rankings]


def write_pipeline(
    folder: Path, name: str = "fake", *, delay: float = 0.0, slow: float | None = None, add_delay: float = 0.0
) -> Path:
    """A pipeline TOML for the fake stages (optionally followed by a slow reranker)."""
    extra = SLOW_STAGE.format(delay=slow) if slow is not None else ""
    path = folder / f"{name}.toml"
    path.write_text(
        PIPELINE_TOML.format(
            name=name, delay=delay, add_delay=add_delay, extra=extra, extra_desc=" + slow reranker" if extra else ""
        )
    )
    return path


TOPICS = ["glacier", "violin", "quasar", "orchid", "falcon", "basalt", "lantern", "meadow"]


def write_topic_corpus(folder: Path, size: int) -> Path:
    """A BEIR folder of ``size`` documents ``c<i>`` (eight topic words, a unique word ``w<i>`` each)."""
    docs = [{"_id": f"c{i}", "title": f"{TOPICS[i % 8]} note {i}", "text": f"{TOPICS[i % 8]} corpus entry number w{i}"}
            for i in range(size)]
    (folder / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (folder / "queries.jsonl").write_text(json.dumps({"_id": "q0", "text": TOPICS[0]}) + "\n")
    (folder / "qrels").mkdir(exist_ok=True)
    (folder / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq0\tc0\t1\n")
    return folder


def register(monkeypatch=None) -> None:
    """Make the fake kinds known (with pytest's monkeypatch when given, else for the process)."""
    from streamrank import compose as registry

    for kind, target in FAKE_KINDS.items():
        if monkeypatch is not None:
            monkeypatch.setitem(registry.STAGE_KINDS, kind, target)
        else:
            registry.STAGE_KINDS[kind] = target


def build_index(config: Path, index_dir: Path, documents: Sequence[Document] = CORPUS) -> None:
    from streamrank.compose import load_pipeline

    pipeline = load_pipeline(config, index_dir=index_dir)
    try:
        pipeline.index(list(documents))
    finally:
        pipeline.close()


# ---- servers ------------------------------------------------------------------------------------
TESTS = Path(__file__).resolve().parent  # tests/service: the server subprocess imports this module from here
REPO = TESTS.parent.parent

BOOTSTRAP = """
import test_service_support
test_service_support.register()
from streamrank.service.app import serve
serve()
"""


def fake_server(config: Path, port: int | None = None) -> ServiceProcess:
    """A server subprocess (settings from ``config``) that knows the fake stage kinds."""
    pythonpath = os.pathsep.join(p for p in (str(TESTS), os.environ.get("PYTHONPATH", "")) if p)
    return ServiceProcess(config, port, env={"PYTHONPATH": pythonpath}, code=BOOTSTRAP)


class ThreadServer:
    """A real uvicorn server on 127.0.0.1 (OS-chosen port) in a background thread, configured as
    ``streamrank serve`` configures it (header timeout, graceful shutdown)."""

    def __init__(self, app) -> None:
        import uvicorn

        from streamrank.service.server import server_config

        self.app = app
        settings = app.state.service.settings
        self.server = uvicorn.Server(server_config(app, settings, host="127.0.0.1", port=0, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> ThreadServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        wait_ready(self.url)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
