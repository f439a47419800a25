"""Shared test setup: offline, one torch thread, Triton in interpreter mode, datasets from ../shared."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

# Must be set before triton or torch are imported anywhere in the test process.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("STREAMRANK_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SHARED_DATASETS = Path(os.environ.get("STREAMRANK_DATASETS", REPO.parent / "shared" / "datasets"))
os.environ.setdefault("STREAMRANK_DATASETS", str(SHARED_DATASETS))


def pytest_configure(config: pytest.Config) -> None:
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:
        pass


@pytest.fixture(scope="session")
def datasets_root() -> Path:
    if not (SHARED_DATASETS / "beir" / "scifact").exists():
        pytest.skip(f"benchmark data not found at {SHARED_DATASETS} (set STREAMRANK_DATASETS)")
    return SHARED_DATASETS


@pytest.fixture(scope="session")
def scifact_head(datasets_root: Path) -> Callable[[int], list]:
    """The first ``n`` SciFact documents (read through the dataset loader the product uses)."""
    from itertools import islice

    from streamrank.datasets import load_dataset

    corpus = load_dataset(datasets_root / "beir" / "scifact")
    return lambda n: list(islice(corpus.corpus(), n))


@pytest.fixture
def tiny_dataset(tmp_path: Path) -> Path:
    """A 40-query BEIR-layout dataset: each topic has a relevant "key answer" and a wordier distractor."""
    folder = tmp_path / "tiny"
    (folder / "qrels").mkdir(parents=True)
    docs, queries, train, test = [], [], ["query-id\tcorpus-id\tscore"], ["query-id\tcorpus-id\tscore"]
    for q in range(40):
        topic = f"topic{q}"
        queries.append({"_id": f"q{q}", "text": f"{topic} question"})
        docs.append({"_id": f"rel{q}", "title": "", "text": f"{topic} key answer"})
        docs.append({"_id": f"dis{q}", "title": "", "text": f"{topic} {topic} question distractor"})
        (train if q < 30 else test).append(f"q{q}\trel{q}\t1")
    (folder / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (folder / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries))
    (folder / "qrels" / "train.tsv").write_text("\n".join(train) + "\n")
    (folder / "qrels" / "test.tsv").write_text("\n".join(test) + "\n")
    return folder


SUMMARY = pytest.StashKey[list[str]]()


@pytest.fixture(scope="session")
def summary_line(pytestconfig: pytest.Config) -> Callable[[str], None]:
    """Add a line to the summary printed at the end of the run (shown without ``-s``)."""
    return pytestconfig.stash.setdefault(SUMMARY, []).append


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    lines = config.stash.get(SUMMARY, [])
    if lines:
        terminalreporter.section("streamrank")
        for line in lines:
            terminalreporter.write_line(line)
