"""Helpers of the Ray tests (fixtures are in conftest.py)."""

from __future__ import annotations

import socket
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

RAY_MISSING = "Ray is not installed: pip install 'streamrank[ray]' (ray[serve]==2.60.0) to run the Ray tests"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_pipelines(folder: Path) -> SimpleNamespace:
    folder.mkdir(parents=True, exist_ok=True)
    dense = folder / "dense.toml"
    dense.write_text('name = "dense"\n[[stages]]\nkind = "dense"\nk = 100\n')
    sharded = folder / "dense-s4.toml"
    sharded.write_text('name = "dense-s4"\nshards = 4\n[[stages]]\nkind = "dense"\nk = 100\n')
    reranked = folder / "rerank.toml"  # the reranker runs in a deployment of its own (see the served fixture)
    reranked.write_text(
        'name = "rerank"\n[[stages]]\nkind = "dense"\nk = 50\n'
        '[[stages]]\nkind = "e2rank"\ndepth = 20\nprompt_docs = 5\nk = 20\n'
    )
    return SimpleNamespace(dense=dense, sharded=sharded, reranked=reranked)


def local_pipeline(path: Path, index_dir: Path, minilm: Any) -> Any:
    from streamrank.compose import load_pipeline
    from streamrank.models import MINILM

    pipeline = load_pipeline(path, index_dir=index_dir)
    pipeline.context.shared(("sentence-encoder", MINILM), lambda: minilm)
    return pipeline


def wait_ready(url: str, timeout: float = 600.0) -> dict[str, Any]:
    import httpx

    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            reply = httpx.get(f"{url}/readyz", timeout=10)
            if reply.status_code == 200:
                return reply.json()
            last = reply.text
        except httpx.HTTPError as exc:
            last = repr(exc)
        time.sleep(1.0)
    raise AssertionError(f"the Ray application did not become ready in {timeout:.0f} s: {last}")


