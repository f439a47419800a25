"""Downloads of known datasets into the cache: BEIR from its official URL, BRIGHT from the Hugging Face hub."""

from __future__ import annotations

import json
import shutil
import tempfile
import zipfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from streamrank.errors import DatasetNotFoundError

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
DOWNLOAD_TIMEOUT_S = 10.0


def cache_dir() -> Path:
    from streamrank.models import cache_home

    return cache_home() / "datasets"


def offline() -> bool:
    """True when datasets may not be downloaded (``STREAMRANK_OFFLINE`` set)."""
    from streamrank.models import env_flag

    return env_flag("STREAMRANK_OFFLINE")


def download(ref: str) -> str | None:
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
    from streamrank.models import env_flag

    if env_flag("HF_HUB_OFFLINE"):
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
