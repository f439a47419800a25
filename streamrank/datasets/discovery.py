"""Finding a dataset by name or folder: $STREAMRANK_DATASETS, the download cache, then a download."""

from __future__ import annotations

import glob
import hashlib
import os
import re
from pathlib import Path

from streamrank.datasets.download import cache_dir, download
from streamrank.datasets.formats import BeirDataset, BrightDataset, Dataset, rows_file
from streamrank.errors import DatasetNotFoundError

SEARCH_DEPTH = 2
"""How many folder levels below a dataset root a name is looked for."""


def dataset_roots() -> list[Path]:
    """Folders searched by name: each entry of $STREAMRANK_DATASETS, then the download cache."""
    env = os.environ.get("STREAMRANK_DATASETS", "")
    return [Path(p).expanduser() for p in env.split(os.pathsep) if p] + [cache_dir()]


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
            rows_file(path.parent / "documents", path.name)
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
    attempt = download(ref)
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


