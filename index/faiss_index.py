"""FAISS indexes for the dense stage: building one of the configured type, its search parameters
(with the selector of live rows), a GPU copy, and reusing a sibling index's (or supplied) embeddings.
The files are :mod:`streamrank.index.dense_segments`'."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from streamrank.index import manifest as mf

if TYPE_CHECKING:
    import numpy as np

    from streamrank.index.dense import DenseConfig
    from streamrank.types import Document

log = logging.getLogger("streamrank.index.dense")


def new_faiss_index(embeddings: np.ndarray, cfg: DenseConfig, stage: str) -> tuple[Any, dict[str, Any]]:
    """A FAISS index of ``cfg.index_type`` holding ``embeddings``, plus facts for the manifest."""
    import faiss

    n, dim = embeddings.shape
    info: dict[str, Any] = {"built_as": cfg.index_type}
    if cfg.index_type == "hnsw":
        index = faiss.IndexHNSWFlat(dim, cfg.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = cfg.ef_construction
    elif cfg.index_type == "ivfpq" and n >= 2**cfg.pq_bits:
        if dim % cfg.pq_m:
            from streamrank.errors import ConfigError

            raise ConfigError(f"dense stage {stage!r}: pq_m = {cfg.pq_m} must divide the dimension {dim}")
        auto = max(1, min(int(4 * math.sqrt(n)), n // 39))
        nlist = min(cfg.nlist or auto, n)
        quantizer = faiss.IndexFlatIP(dim)
        index = faiss.IndexIVFPQ(quantizer, dim, nlist, cfg.pq_m, cfg.pq_bits, faiss.METRIC_INNER_PRODUCT)
        recommended = 39 * 2**cfg.pq_bits
        if n < recommended:  # one line here instead of FAISS's warning per sub-quantizer
            log.warning("dense stage %r: IVF-PQ trained on %d vectors (FAISS suggests %d)", stage, n, recommended)
            index.pq.cp.min_points_per_centroid = 1
            index.cp.min_points_per_centroid = 1
        index.train(embeddings)
        info["nlist"] = nlist
    else:
        if cfg.index_type == "ivfpq":
            reason = (
                f"{n} documents are too few to train IVF-PQ ({2**cfg.pq_bits} needed for pq_bits = "
                f"{cfg.pq_bits}); built an exact flat index instead"
            )
            log.warning("dense stage %r: %s", stage, reason)
            info.update(built_as="flat", fallback=reason)
        index = faiss.IndexFlatIP(dim)
    if n:
        index.add(embeddings)
    return index, info


def search_parameters(cfg: DenseConfig, built_as: str, depth: int, selector: Any = None) -> Any:
    """Search-time parameters for a CPU index built as ``built_as``, filtering by ``selector`` when
    given (the live rows; None for a flat index without one)."""
    import faiss

    extra = {} if selector is None else {"sel": selector}
    if built_as == "hnsw":
        # the configured depth sets the beam, so a shallower request sees the same neighbours
        return faiss.SearchParametersHNSW(efSearch=max(cfg.ef_search, cfg.k, depth), **extra)
    if built_as == "ivfpq":
        return faiss.SearchParametersIVF(nprobe=cfg.nprobe, **extra)
    return faiss.SearchParameters(**extra) if selector is not None else None


def gpu_copy(index: Any, built_as: str, nprobe: int) -> Any | None:
    """A GPU copy of ``index`` when faiss-gpu sees a GPU (flat and IVF-PQ; HNSW has none), else None."""
    import faiss

    if built_as == "hnsw" or getattr(faiss, "get_num_gpus", lambda: 0)() == 0:
        return None
    gpu = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
    if built_as == "ivfpq":
        faiss.GpuParameterSpace().set_index_parameter(gpu, "nprobe", nprobe)
    return gpu


def sibling_embeddings(
    folder: Path, wanted: dict[str, Any], checksum: str | None, ids: Sequence[str]
) -> tuple[str, np.ndarray] | None:
    """Embeddings of exactly ``ids`` stored by a sibling of ``folder`` whose settings match ``wanted`` and
    whose corpus checksum is ``checksum`` (another index_type of the same model, prompt and corpus), so
    switching index type never re-encodes the corpus; with the sibling's folder name."""
    import numpy as np

    from streamrank.index.dense_segments import paths

    if checksum is None:
        return None
    for path in sorted(folder.parent.glob(f"*/{mf.MANIFEST_NAME}")):
        sibling = path.parent
        manifest = mf.read_manifest(sibling) or {}
        settings = manifest.get("settings", {})
        if sibling == folder or any(settings.get(k) != v for k, v in wanted.items()):
            continue
        info = manifest.get("info", {})
        if manifest.get("corpus_checksum") != checksum or info.get("segments"):  # a log to replay: not as built
            continue
        files = paths(sibling, str(info.get("generation", "")))
        try:
            if json.loads(files["ids"].read_text()) != list(ids):
                continue
            emb = np.load(files["embeddings"])
        except (OSError, ValueError):
            continue
        if emb.shape[0] == len(ids):
            log.info("dense index %s: reusing the embeddings of %s", folder, sibling)
            return sibling.name, np.ascontiguousarray(emb, dtype=np.float32)
    return None


def supplied_rows(
    vectors: Mapping[str, np.ndarray] | None, documents: Sequence[Document], source: str = "supplied"
) -> tuple[str, np.ndarray] | None:
    """(``source``, the rows of ``vectors`` for ``documents`` in order) when every document has one, else None."""
    import numpy as np

    if vectors is None or not documents or any(d.id not in vectors for d in documents):
        return None
    return source, np.ascontiguousarray(np.stack([vectors[d.id] for d in documents]), dtype=np.float32)
