"""Dense retrieval: a sentence-transformers encoder and a FAISS index over normalised embeddings.

``index_type``: ``flat`` (default, exact inner product = cosine), ``hnsw`` (``IndexHNSWFlat``;
``hnsw_m``, ``ef_construction``, ``ef_search`` at query time) or ``ivfpq`` (``IndexIVFPQ`` trained on the
corpus; ``nlist`` default about ``min(4*sqrt(n), n/39)``, ``pq_m`` x ``pq_bits``, ``nprobe`` at query
time; a corpus too small to train PQ gets ``flat``, said in the warning and ``info.built_as``). The FAISS
index runs on a GPU when faiss-gpu sees one (flat and ivfpq).

``<index_dir>/dense`` holds a base generation (``index.faiss``, ``ids.json``: row -> doc id, ``null`` for a
replaced or deleted row, ``embeddings.npy``: float32, read by other stages through
:meth:`DenseRetriever.embeddings_for`), an append-only segment log and ``manifest.json``
(:mod:`streamrank.index.dense_segments`). A write encodes only the new documents, appends one record
to the log (fsynced before it is acknowledged) and adds the vectors to FAISS; a delete appends
tombstones, which searches filter inside FAISS (an ``IDSelectorBitmap``). Nothing is rewritten per
write: compaction writes a new generation in a background thread (no lock held while it writes)
once tombstones are ``compact_tombstones`` of the rows, the log holds ``compact_segments`` records or
as many rows as the base, then switches to it atomically.

Texts get the model's own sentence-transformers prompts (EmbeddingGemma's ``task: search result |
query: `` and ``title: none | text: ``) unless a prefix is configured. A build saves its encoding
progress beside the index folder every minute and a rerun resumes from it (hours for a 300M encoder
on a CPU); ``dtype = "bfloat16"`` runs the encoder in bfloat16.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, field_validator

from streamrank.encoding import Role, SentenceEncoding
from streamrank.errors import IndexMismatchError
from streamrank.index import manifest as mf
from streamrank.index.base import IndexedConfig, IndexedRetriever
from streamrank.models import MINILM
from streamrank.types import Document, ModelCall, Ranking

if TYPE_CHECKING:
    import numpy as np

    from streamrank.index.dense_segments import DenseState

log = logging.getLogger(__name__)

COMPACT_FRACTION = 0.25
"""Default ``compact_tombstones``: compact once this share of the rows is tombstoned."""
REUSE_KEYS = ("kind", "model", "normalized", "document_prefix", "document_prompt", "dtype", "lowrank")
"""Settings under which a sibling dense index's stored embeddings are this index's embeddings."""
SHOW_PROGRESS_FROM = 1000
"""Show a progress bar when encoding at least this many documents."""


class DenseConfig(IndexedConfig):
    model: str = MINILM
    """Sentence-transformers model: a Hugging Face id, a local folder, or the packaged MiniLM."""
    index_type: Literal["flat", "hnsw", "ivfpq"] = "flat"
    hnsw_m: int = Field(32, ge=2)
    ef_construction: int = Field(200, ge=8)
    ef_search: int = Field(128, ge=1)
    """Search-time HNSW breadth (raised to the search depth when that is larger)."""
    nlist: int | None = Field(None, ge=1)
    """IVF cells; None picks about min(4*sqrt(n), n/39)."""
    pq_m: int = Field(48, ge=1)
    """PQ sub-quantizers; must divide the embedding dimension (384 for MiniLM)."""
    pq_bits: int = Field(8, ge=1, le=16)
    nprobe: int = Field(16, ge=1)
    """Search-time IVF cells visited."""
    batch_size: int = Field(64, ge=1)
    query_prefix: str = ""
    """Text put before every query (models such as E5 expect "query: "); when empty, the model's own
    ``query`` prompt (sentence-transformers prompts, e.g. EmbeddingGemma's) if it defines one."""
    document_prefix: str = ""
    """Text put before every document (index-time: a change needs a rebuild); when empty, the model's own
    ``document`` prompt if it defines one."""
    use_model_prompts: bool = True
    """Use the model's query/document prompts where no prefix is given (False: plain text)."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Encoder weights dtype; bfloat16 is several times faster on CPUs with AVX-512 BF16 / AMX and on GPUs,
    with vectors a little different (index-time: a change needs a rebuild)."""
    query_dtype: Literal["float32", "bfloat16", "auto"] | None = None
    """Dtype of the query encoder (search-time: no rebuild). None: ``dtype``; ``auto``: bfloat16 where it
    runs natively (CUDA, CPUs with AVX-512 BF16 or AMX), else ``dtype``. bfloat16 query vectors against a
    float32 index: cosine >= 0.998 to the float32 ones, 2.6x faster at batch 16 on such a CPU (BENCHMARKS.md)."""
    use_gpu: bool = True
    """Search on a GPU copy of the FAISS index when faiss-gpu sees a GPU."""
    auto_compact: bool = True
    """Compact in a background thread when a trigger below is reached (False: only ``compact()``)."""
    compact_tombstones: float = Field(COMPACT_FRACTION, gt=0, le=1)
    """Compact once this share of the index's rows are tombstones (deleted or replaced documents)."""
    compact_segments: int = Field(4096, ge=1)
    """Compact once the log holds this many records (one per write)."""
    history_weight: float = Field(0.0, ge=0, le=1)
    """Mix the query vector with the centroid of the request's user_history embeddings (0 = off)."""
    lowrank: dict[str, Any] | None = None
    """SVD-compressed encoder on the fused low-rank kernels, e.g. ``{ratio = 0.5, backend = "auto"}``
    (keys of :class:`streamrank.kernels.lowrank.LowRankSettings`). Embeddings change, so a
    low-rank index is a different index: give it its own ``index`` folder."""

    @field_validator("lowrank")
    @classmethod
    def _check_lowrank(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None:
            from streamrank.kernels.lowrank import LowRankSettings

            LowRankSettings.from_dict(value)  # raises ValueError naming an unknown key
        return value


def canonical_model(name: str) -> str:
    """One name per model, so "minilm" and the packaged path compare equal to the hub id."""
    from streamrank.models import sentence_model_path

    resolved = sentence_model_path(name)
    return MINILM if resolved == sentence_model_path(MINILM) else name


class DenseRetriever(IndexedRetriever):
    """Cosine similarity between the query and document embeddings of one sentence-transformers model.

    Besides the Stage API it offers :meth:`encode_queries`, :meth:`encode_documents` and
    :meth:`embeddings_for` to other stages (E2Rank, the kNN graph), which reuse the stored vectors.
    """

    Config = DenseConfig
    config: DenseConfig
    WRITES_TAKE_LOCK = False  # searches go on while a write fsyncs; the lock is taken to apply it
    libraries = ("faiss-cpu", "faiss-gpu", "sentence-transformers", "torch", "transformers", "numpy")

    def __init__(self, config: DenseConfig, context: Any) -> None:
        super().__init__(config, context)
        self._state: DenseState | None = None  # the open index (FAISS, vectors, ids, tombstones, log position)
        self._compacting = threading.Lock()
        self._compactor: threading.Thread | None = None
        self._supplied: Mapping[str, np.ndarray] | None = None  # see supply_embeddings

    # ---- encoding -----------------------------------------------------------------------------
    @property
    def encoding(self) -> SentenceEncoding:
        """The document-side encoding (the index's dtype), also what other stages reuse."""
        return self._encoding(self.config.dtype)

    @property
    def query_encoding(self) -> SentenceEncoding:
        """The query-side encoding: the index's, or the same model in ``query_dtype``."""
        from streamrank.models import resolve_dtype

        cfg = self.config
        if cfg.query_dtype is None:
            return self.encoding
        return self._encoding(resolve_dtype(cfg.query_dtype, self.context.device, fallback=cfg.dtype))

    def _encoding(self, dtype: str) -> SentenceEncoding:
        cfg = self.config
        lowrank = json.dumps(cfg.lowrank, sort_keys=True) if cfg.lowrank is not None else None
        return SentenceEncoding(
            self.context,
            cfg.model,
            dtype=dtype,
            batch_size=cfg.batch_size,
            use_model_prompts=cfg.use_model_prompts,
            prefixes={"query": cfg.query_prefix, "document": cfg.document_prefix},
            variant=lowrank,
            loader=(lambda: self._lowrank_encoder(dtype)) if lowrank is not None else None,
        )

    @property
    def encoder(self) -> Any:
        """The sentence-transformers model (a private low-rank copy when ``lowrank`` is set)."""
        return self.encoding.model

    def _lowrank_encoder(self, dtype: str) -> Any:
        """A private copy of the encoder, SVD-compressed (the shared uncompressed one stays as it is)."""
        from streamrank.kernels.lowrank import LowRankSettings
        from streamrank.models import load_sentence_encoder

        encoder = load_sentence_encoder(self.config.model, self.context.device, dtype)
        LowRankSettings.from_dict(self.config.lowrank or {}).apply(encoder)
        return encoder

    def _encode(self, texts: Sequence[str], role: Role, checkpoint: Path | None = None) -> np.ndarray:
        progress = len(texts) >= SHOW_PROGRESS_FROM
        encoding = self.query_encoding if role == "query" else self.encoding
        return encoding.encode(texts, role, progress=progress, checkpoint=checkpoint)

    def encode_queries(self, texts: Sequence[str]) -> np.ndarray:
        """Normalised float32 query embeddings, shape (len(texts), dim)."""
        return self._encode(texts, "query")

    def encode_documents(self, documents: Sequence[Document], checkpoint: Path | None = None) -> np.ndarray:
        """Normalised float32 embeddings of the documents' ``contents``, as the index stores them.

        ``checkpoint``: a folder where a long encoding saves its progress and resumes after a crash."""
        return self._encode([d.contents for d in documents], "document", checkpoint)

    def checkpoint_folder(self) -> Path:
        """Where a build's encoding progress is kept until the index is written (beside the index folder)."""
        return self.folder.with_name(f".{self.folder.name}.encoding")

    def embeddings_for(self, doc_ids: Sequence[str]) -> np.ndarray:
        """Stored embeddings of ``doc_ids`` (rows in the given order).

        Ids the index lacks are encoded from the document store; KeyError for ids neither has.
        """
        import numpy as np

        self._ensure_open()
        with self.lock:
            state = self._open_state()
            rows = [state.row_of.get(i) for i in doc_ids]
            out = np.zeros((len(doc_ids), self._dimension()), dtype=np.float32)
            have = [n for n, r in enumerate(rows) if r is not None]
            if have:
                out[have] = state.vectors.view()[[rows[n] for n in have]]
        missing = [n for n, r in enumerate(rows) if r is None]
        if missing:
            found = self.context.store.get_many([doc_ids[n] for n in missing])
            absent = [doc_ids[n] for n in missing if doc_ids[n] not in found]
            if absent:
                raise KeyError(f"documents not in the dense index nor the store: {absent[:5]}")
            out[missing] = self.encode_documents([found[doc_ids[n]] for n in missing])
        return out

    def nearest(self, doc_ids: Sequence[str], k: int) -> list[list[tuple[str, float]]]:
        """The ``k`` live documents nearest each of ``doc_ids`` (by its stored vector, itself included),
        searched in the index as queries are: what the corpus graph links a new document to."""
        vectors = self.embeddings_for(doc_ids)
        with self.lock:
            return self._search([None] * len(doc_ids), vectors, k)  # type: ignore[list-item]

    def stored_vectors(self, doc_ids: Sequence[str]) -> dict[str, np.ndarray]:
        """Stored embeddings of those of ``doc_ids`` the index holds (none when there is no index)."""
        if not self._try_open():
            return {}
        with self.lock:
            state = self._open_state()
            vectors = state.vectors.view()
            return {i: vectors[state.row_of[i]] for i in doc_ids if i in state.row_of}

    # ---- index settings and files -------------------------------------------------------------
    def vector_settings(self) -> dict[str, Any]:
        """What the stored vectors depend on, from the config alone (compared when another stage names
        this one in ``vectors_from``)."""
        cfg = self.config
        return {"model": cfg.model, "dtype": cfg.dtype, "document_prefix": cfg.document_prefix,
                "use_model_prompts": cfg.use_model_prompts, "lowrank": cfg.lowrank}

    def settings(self) -> dict[str, Any]:
        cfg = self.config
        settings: dict[str, Any] = {
            "kind": "dense",
            "model": canonical_model(cfg.model),
            "normalized": True,
            "document_prefix": cfg.document_prefix,
            "index_type": cfg.index_type,
        }
        document_prompt = self.encoding.prompt("document")
        if document_prompt != cfg.document_prefix:  # the model's own prompt (absent for models without one)
            settings["document_prompt"] = document_prompt
        if cfg.dtype != "float32":
            settings["dtype"] = cfg.dtype
        if cfg.lowrank is not None:
            settings["lowrank"] = cfg.lowrank
        if cfg.index_type == "hnsw":
            settings.update(hnsw_m=cfg.hnsw_m, ef_construction=cfg.ef_construction)
        elif cfg.index_type == "ivfpq":
            settings.update(nlist=cfg.nlist, pq_m=cfg.pq_m, pq_bits=cfg.pq_bits)
        return settings

    def _open_state(self) -> DenseState:
        assert self._state is not None, "the dense index is not open"
        return self._state

    def _dimension(self) -> int:
        return int(self._open_state().vectors.view().shape[1])

    def _new_index(self, embeddings: np.ndarray) -> tuple[Any, dict[str, Any]]:
        from streamrank.index.faiss_index import new_faiss_index

        return new_faiss_index(embeddings, self.config, self.name)

    def _info(self, state: DenseState | None = None, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        state = state or self._open_state()
        info = dict(self._manifest["info"]) if self._manifest else {}
        info.update(extra or {})
        info.update(
            doc_count=len(state.row_of),
            rows=state.rows,
            masked_rows=state.tombstones,
            dimension=int(state.vectors.view().shape[1]),
            generation=state.generation,
            base_rows=state.base_rows,
            segments=state.segments,
            log_bytes=state.log_end,
            built_as=state.built_as,
        )
        return info

    def _write(self, folder: Path, documents: list[Document]) -> dict[str, Any]:
        started = time.perf_counter()
        from streamrank.index.faiss_index import sibling_embeddings, supplied_rows

        settings = self.settings()
        wanted = {k: settings.get(k) for k in REUSE_KEYS}
        reused = supplied_rows(self._supplied, documents, "supplied") or sibling_embeddings(
            self.folder, wanted, self._build_checksum, [d.id for d in documents]
        )
        if reused is not None:
            source, emb = reused
        else:
            source, emb = None, self.encode_documents(documents, checkpoint=self.checkpoint_folder())
        encode_s = time.perf_counter() - started
        from streamrank.index.dense_segments import DenseState, write_generation

        index, info = self._new_index(emb)
        ids: list[str | None] = [d.id for d in documents]
        write_generation(folder, "", index, ids, emb)
        info = self._info(DenseState(index, ids, emb, "", info["built_as"]), info)
        info["encode_seconds"] = round(encode_s, 1)
        if source is not None:
            info["embeddings_from"] = source
        return info

    def _open(self, folder: Path, manifest: dict[str, Any]) -> None:
        from streamrank.index.dense_segments import read_generation

        self._state = read_generation(folder, manifest)

    def _release(self) -> None:
        self._state = None

    def _follow(self, folder: Path, manifest: dict[str, Any]) -> None:
        """Follow another process's writes: within the same build and generation, apply the log records
        appended since (no file is read again); a rebuild or a compacted generation is opened anew."""
        from streamrank.index.dense_segments import catch_up, paths

        state, known = self._state, self._manifest or {}
        info = manifest.get("info", {})
        same = (
            state is not None
            and manifest.get("created") == known.get("created")
            and str(info.get("generation", "")) == state.generation
            and int(info.get("log_bytes", 0)) >= state.log_end
        )
        if not same:
            super()._follow(folder, manifest)
            return
        assert state is not None
        catch_up(state, paths(folder, state.generation)["log"])

    # ---- updates ------------------------------------------------------------------------------
    @contextmanager
    def supply_embeddings(self, vectors: Mapping[str, np.ndarray]) -> Iterator[None]:
        """Inside the block, builds and additions take these vectors (doc id -> embedding: a sharded
        build's, or Ray Data's) instead of encoding, when every document has one."""
        self._supplied = vectors
        try:
            yield
        finally:
            self._supplied = None

    def _prepare_add(self, documents: Sequence[Document]) -> np.ndarray:
        from streamrank.index.faiss_index import supplied_rows

        supplied = supplied_rows(self._supplied, documents)
        return supplied[1] if supplied is not None else self.encode_documents(documents)

    def _add(self, documents: Sequence[Document], new: np.ndarray | None = None) -> dict[str, Any]:
        from streamrank.index.dense_segments import ADD

        if new is None:
            new = self.encode_documents(documents)
        if new.shape[1] != self._dimension():
            raise IndexMismatchError(
                f"{self.config.model} gives {new.shape[1]}-d vectors but the index at {self.folder} holds "
                f"{self._dimension()}-d ones; {mf.REBUILD_HINT}"
            )
        return self._append(ADD, [d.id for d in documents], new)

    def _delete(self, doc_ids: Sequence[str]) -> dict[str, Any]:
        from streamrank.index.dense_segments import DELETE

        state = self._caught_up()
        present = [doc_id for doc_id in doc_ids if doc_id in state.row_of]
        return self._append(DELETE, present) if present else self._info()

    @contextmanager
    def _reload_on_error(self) -> Iterator[None]:
        """A disk error leaves the open state as it was (a record is applied only once it is on disk,
        and a failed append is cut back), so keep it instead of reloading the whole index."""
        try:
            yield
        except OSError:
            raise
        except BaseException:
            self._forget()
            raise

    def _caught_up(self) -> DenseState:
        """The open state with the records another process appended (or wrote before it crashed) applied."""
        from streamrank.index.dense_segments import catch_up, paths

        with self.lock:
            state = self._open_state()
            catch_up(state, paths(self.folder, state.generation)["log"])
            return state

    def _append(self, op: int, ids: list[str], vectors: np.ndarray | None = None) -> dict[str, Any]:
        """Append one record to the log (durable when this returns), apply it, maybe start compaction.

        Called holding the folder's writer lock (``IndexedStage.add``/``delete``), which keeps other
        writers and compaction's switch out; :attr:`lock` (what searches hold) only while applying."""
        from streamrank.index.dense_segments import Record, append, encode_record, paths

        state = self._caught_up()
        log_end = append(paths(self.folder, state.generation)["log"], encode_record(op, ids, vectors), state.log_end)
        with self.lock:
            state.log_end = log_end
            state.segments += 1
            state.apply(Record(op, ids, vectors))
            info = self._info(state)
        if self.config.auto_compact and self._compaction_due(state):
            self.compact(background=True)
        return info

    def _compaction_due(self, state: DenseState) -> bool:
        cfg = self.config
        return (
            state.tombstones >= max(1, cfg.compact_tombstones * state.rows)
            or state.segments >= cfg.compact_segments
            or state.rows - state.base_rows >= max(1024, state.base_rows)
        )

    def _live_ids(self) -> list[str]:
        return self._open_state().live_ids()

    # ---- compaction ---------------------------------------------------------------------------
    def compact(self, background: bool = False) -> bool:
        """Rewrite the index without its tombstones and log: a new generation written with no lock
        held (searches and writes go on), then switched to under the lock. Returns False when a
        compaction is already running (or, with ``background``, once the thread has started)."""
        if background:
            if self._compactor is not None and self._compactor.is_alive():
                return False
            self._compactor = threading.Thread(target=self._compact_logged, name=f"compact-{self.name}", daemon=True)
            self._compactor.start()
            return False
        if not self._compacting.acquire(blocking=False):
            return False
        try:
            return self._compact()
        finally:
            self._compacting.release()

    def _compact_logged(self) -> None:
        try:
            self.compact()
        except Exception:  # the index stays as it was; the next trigger tries again
            log.exception("dense stage %r: background compaction failed", self.name)

    def _compact(self) -> bool:
        import numpy as np

        from streamrank.index import dense_segments as seg

        folder = self.folder
        started = time.perf_counter()
        with self.lock:
            self._ensure_open()
            old = self._open_state()
            generation, end, ids = old.generation, old.log_end, list(old.ids)
            vectors = old.vectors.view()  # rows [0, len(ids)) never change: appends go past them
        live = [row for row, doc_id in enumerate(ids) if doc_id is not None]
        emb = np.ascontiguousarray(vectors[live])
        index, extra = self._new_index(emb)
        live_ids: list[str | None] = [ids[row] for row in live]
        tag = seg.new_generation()
        seg.write_generation(folder, tag, index, live_ids, emb)
        seg.fault_point("compaction-written")
        with mf.writer_lock(folder), self.lock:
            self._ensure_open()
            current = self._open_state()
            if current.generation != generation:  # another process compacted meanwhile
                for path in seg.paths(folder, tag).values():
                    path.unlink(missing_ok=True)
                return False
            old_log = seg.paths(folder, generation)["log"]
            seg.catch_up(current, old_log)
            tail = b""
            if current.log_end > end:
                with open(old_log, "rb") as handle:
                    handle.seek(end)
                    tail = handle.read(current.log_end - end)
            new_log = seg.paths(folder, tag)["log"]
            mf.write_atomic(new_log, lambda tmp: tmp.write_bytes(tail))
            fresh = seg.DenseState(index, live_ids, emb, tag, extra["built_as"])
            seg.catch_up(fresh, new_log)  # what was written while the new generation was being written
            info = self._info(fresh, extra)
            info["compaction_seconds"] = round(time.perf_counter() - started, 2)
            self._save_manifest(info, self.manifest_checksum())  # the switch
            self._state = fresh
            seg.fault_point("compaction-switched")
            seg.remove_strays(folder, tag)
        log.info("dense stage %r: compacted %d rows to %d in %.1f s", self.name, len(ids), len(live), time.perf_counter() - started)
        return True

    def wait_for_compaction(self) -> None:
        """Return once a background compaction that is running has finished."""
        compactor = self._compactor
        if compactor is not None:
            compactor.join()

    def close(self) -> None:
        self.wait_for_compaction()
        super().close()

    # ---- searching ----------------------------------------------------------------------------
    def _prepare(self, rankings: Sequence[Ranking]) -> np.ndarray:
        started = time.perf_counter()
        vectors = self.encode_queries([r.query.text for r in rankings])
        share = (time.perf_counter() - started) / max(1, len(rankings))
        for r in rankings:
            r.calls.append(ModelCall(self.name, self.config.model, seconds=share, note="query embedding"))
        if self.config.history_weight > 0:
            self._personalise(rankings, vectors)
        return vectors

    def _personalise(self, rankings: Sequence[Ranking], vectors: np.ndarray) -> None:
        """Mix each query vector with the centroid of its user history (known documents only)."""
        from streamrank.index.graph import personalised_query

        row_of = self._open_state().row_of if self._state is not None else {}
        for i, r in enumerate(rankings):
            history = [d for d in r.query.user_history if d in row_of or d in self.context.store]
            if history:
                vectors[i] = personalised_query(vectors[i], self.embeddings_for(history), self.config.history_weight)

    def _search(self, rankings: Sequence[Ranking], prepared: np.ndarray, k: int) -> list[list[tuple[str, float]]]:
        """Top ``k`` live rows: tombstones filtered inside FAISS by a selector of the live rows (a GPU
        copy, which takes no selector, is searched ``k`` + tombstones deep instead)."""
        from streamrank.index.faiss_index import gpu_copy, search_parameters

        state = self._open_state()
        k = min(k, len(state.row_of))
        if k == 0:
            return [[] for _ in rankings]
        if state.gpu is None and self.config.use_gpu:
            state.gpu = gpu_copy(state.index, state.built_as, self.config.nprobe)
        if state.gpu is not None:
            depth = min(state.index.ntotal, k + state.tombstones)
            scores, rows = state.gpu.search(prepared, depth)
        else:
            selector = state.selector()
            params = search_parameters(self.config, state.built_as, k, selector)
            scores, rows = state.index.search(prepared, k, params=params)
        ids = state.ids
        return [
            [(ids[r], float(s)) for s, r in zip(row_scores, row_ids, strict=True) if r >= 0 and ids[r] is not None][:k]
            for row_scores, row_ids in zip(scores, rows, strict=True)
        ]

    def _score_pool(self, rankings: Sequence[Ranking], prepared: np.ndarray) -> list[list[float]]:
        from streamrank.index.dense_pool import score_supplied_pool

        return score_supplied_pool(self, rankings, prepared)
