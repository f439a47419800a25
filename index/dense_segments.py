"""The dense index on disk and in memory: a base generation plus an append-only segment log.

Files of a generation tagged ``T`` in the index folder (the first generation, tag ``""``, keeps the
names older versions wrote): ``indexT.faiss``, ``idsT.json`` (row -> doc id, ``null`` for a tombstoned
row), ``embeddingsT.npy`` and ``segmentsT.log``. The manifest names the generation (``info.generation``,
a random tag per compaction, so two processes never write the same files); it is the switch
compaction flips.

Every write appends one record to the log (an add: ids and their float32 vectors; a delete: ids)
and fsyncs it before the write is acknowledged, so a write costs what it writes. A record is
``header | ids (JSON) | vectors | CRC32``; opening replays the complete records and ignores a torn
tail (a crash in mid-append), which the next append cuts off. Deletes are tombstones: a bitmap of
live rows that searches pass to FAISS as an ``IDSelectorBitmap``, so nothing is over-fetched.
FAISS labels are row numbers (rows are only ever appended); ``ids`` maps them to document ids.

Compaction (``DenseRetriever.compact``) writes a new generation from the live rows without any lock;
the caller then copies the log records written meanwhile into the new generation's log, writes
the manifest (the atomic switch) and removes the old files. A crash at any point leaves the
manifest naming one complete generation; files of another generation are strays, removed later.
"""

from __future__ import annotations

import json
import os
import signal
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from streamrank.errors import IndexInconsistent
from streamrank.index import manifest as mf

if TYPE_CHECKING:
    import numpy as np

_HEADER = struct.Struct("<4sBIII")  # magic, op, count, dim, bytes of ids
_MAGIC = b"SRS1"
_CRC = struct.Struct("<I")
ADD, DELETE = 1, 2
FAULT_ENV = "STREAMRANK_FAULT_POINT"
"""Names a point where the process SIGKILLs itself (the fault suite's crash points): ``append-torn``
(half a record written and synced), ``compaction-writing`` (part of the new generation written),
``compaction-written`` (new generation written, not switched),
``compaction-switched`` (switched, old files not yet removed)."""


def fault_point(name: str) -> None:
    """SIGKILL this process when ``$STREAMRANK_FAULT_POINT`` names this point (crash tests)."""
    if os.environ.get(FAULT_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)


def new_generation() -> str:
    import uuid

    return f".g{uuid.uuid4().hex[:12]}"


def paths(folder: Path, tag: str) -> dict[str, Path]:
    """The files of one generation."""
    return {
        "index": folder / f"index{tag}.faiss",
        "ids": folder / f"ids{tag}.json",
        "embeddings": folder / f"embeddings{tag}.npy",
        "log": folder / f"segments{tag}.log",
    }


def remove_strays(folder: Path, generation: str) -> None:
    """Delete files of generations other than ``generation`` (left by a crash or a finished compaction);
    call it holding the folder's writer lock."""
    keep = set(paths(folder, generation).values())
    for pattern in ("index*.faiss", "ids*.json", "embeddings*.npy", "segments*.log"):
        for path in folder.glob(pattern):
            if path not in keep:
                path.unlink(missing_ok=True)


# ---- records -----------------------------------------------------------------------------------------
@dataclass
class Record:
    op: int
    ids: list[str]
    vectors: np.ndarray | None = None


def encode_record(op: int, ids: Sequence[str], vectors: np.ndarray | None = None) -> bytes:
    import numpy as np

    id_bytes = json.dumps(list(ids)).encode()
    body = b"" if vectors is None else np.ascontiguousarray(vectors, dtype="<f4").tobytes()
    dim = 0 if vectors is None else int(vectors.shape[1])
    head = _HEADER.pack(_MAGIC, op, len(ids), dim, len(id_bytes))
    return head + id_bytes + body + _CRC.pack(zlib.crc32(head + id_bytes + body))


def decode_records(data: bytes | memoryview, start: int = 0) -> tuple[list[Record], int]:
    """The complete records in ``data`` from ``start`` and the offset after the last one (a torn or
    corrupt tail ends the list)."""
    import numpy as np

    records, pos = [], start
    while pos + _HEADER.size <= len(data):
        magic, op, count, dim, id_len = _HEADER.unpack_from(data, pos)
        end = pos + _HEADER.size + id_len + 4 * count * dim
        if magic != _MAGIC or op not in (ADD, DELETE) or end + _CRC.size > len(data):
            break
        (crc,) = _CRC.unpack_from(data, end)
        if zlib.crc32(data[pos:end]) != crc:
            break
        ids = json.loads(bytes(data[pos + _HEADER.size : pos + _HEADER.size + id_len]))
        vectors = None
        if op == ADD:
            vectors = np.frombuffer(data, dtype="<f4", count=count * dim, offset=pos + _HEADER.size + id_len)
            vectors = vectors.reshape(count, dim).astype(np.float32)
        records.append(Record(op, ids, vectors))
        pos = end + _CRC.size
    return records, pos


def read_log(path: Path, start: int = 0) -> tuple[list[Record], int]:
    """Complete records of the log at ``path`` from byte ``start`` (none when it does not exist)."""
    try:
        with open(path, "rb") as handle:
            handle.seek(start)
            data = handle.read()
    except FileNotFoundError:
        return [], start
    records, end = decode_records(data)
    return records, start + end


def append(path: Path, payload: bytes, end: int) -> int:
    """Write ``payload`` at offset ``end`` of the log (cutting off a torn tail there) and fsync it;
    returns the new end. On an error the log is cut back to ``end`` (nothing of the write kept)."""
    created = not path.exists()
    with open(path, "ab" if created else "r+b") as handle:
        try:
            handle.truncate(end)
            handle.seek(end)
            if os.environ.get(FAULT_ENV) == "append-torn":
                handle.write(payload[: len(payload) // 2])
                handle.flush()
                os.fsync(handle.fileno())
                fault_point("append-torn")
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        except BaseException:
            try:
                handle.truncate(end)
                os.fsync(handle.fileno())
            except OSError:
                pass  # the torn tail stays; opening ignores it and the next append cuts it off
            raise
    if created:
        fsync_folder(path.parent)
    return end + len(payload)


def fsync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---- the in-memory state -----------------------------------------------------------------------------
class Rows:
    """A float32 matrix that grows by appending (capacity grows by a quarter: amortised O(rows added))."""

    def __init__(self, base: np.ndarray) -> None:
        self._buf = base
        self.n = int(base.shape[0])

    def append(self, new: np.ndarray) -> None:
        import numpy as np

        need = self.n + new.shape[0]
        if need > self._buf.shape[0]:
            grown = np.empty((max(need, self._buf.shape[0] * 5 // 4 + 1024), new.shape[1]), dtype=np.float32)
            grown[: self.n] = self._buf[: self.n]
            self._buf = grown
        self._buf[self.n : need] = new
        self.n = need

    def view(self) -> np.ndarray:
        """Rows ``[0, n)``: stays valid (and unchanged) while more rows are appended."""
        return self._buf[: self.n]


class DenseState:
    """One dense index in memory: FAISS index, vectors, row ids, the live bitmap and the log position."""

    def __init__(self, index: Any, ids: list[str | None], vectors: np.ndarray, generation: str, built_as: str) -> None:
        import numpy as np

        self.index, self.ids, self.vectors = index, ids, Rows(vectors)
        self.generation, self.built_as = generation, built_as
        self.base_rows = len(ids)
        self.row_of = {doc_id: row for row, doc_id in enumerate(ids) if doc_id is not None}
        self.bits = np.zeros(max(1024, (len(ids) * 5 // 4 + 7) // 8), dtype=np.uint8)
        live = np.array([doc_id is not None for doc_id in ids], dtype=bool)
        packed = np.packbits(live, bitorder="little")
        self.bits[: packed.size] = packed
        self.log_end = 0
        self.segments = 0
        self.gpu: Any = None

    @property
    def rows(self) -> int:
        return len(self.ids)

    @property
    def tombstones(self) -> int:
        return len(self.ids) - len(self.row_of)

    def _set_bit(self, row: int, live: bool) -> None:
        if live:
            self.bits[row >> 3] |= 1 << (row & 7)
        else:
            self.bits[row >> 3] &= 0xFF ^ (1 << (row & 7))

    def apply(self, record: Record) -> None:
        """Apply one log record (an add replaces earlier rows of the same ids)."""
        import numpy as np

        for doc_id in record.ids:
            row = self.row_of.pop(doc_id, None)
            if row is not None:
                self.ids[row] = None
                self._set_bit(row, False)
        if record.op != ADD:
            return
        assert record.vectors is not None
        start = len(self.ids)
        need = (start + len(record.ids) + 7) // 8
        if need > self.bits.size:
            grown = np.zeros(max(need, self.bits.size * 5 // 4 + 128), dtype=np.uint8)
            grown[: self.bits.size] = self.bits
            self.bits = grown
        self.index.add(record.vectors)
        if self.gpu is not None:
            self.gpu.add(record.vectors)
        self.vectors.append(record.vectors)
        for offset, doc_id in enumerate(record.ids):
            self.ids.append(doc_id)
            self.row_of[doc_id] = start + offset
            self._set_bit(start + offset, True)

    def selector(self) -> Any:
        """A FAISS selector of the live rows (None without tombstones: nothing to filter)."""
        import faiss

        if not self.tombstones:
            return None
        return faiss.IDSelectorBitmap(self.rows, faiss.swig_ptr(self.bits))

    def live_ids(self) -> list[str]:
        return [doc_id for doc_id in self.ids if doc_id is not None]


# ---- files -------------------------------------------------------------------------------------------
def write_generation(folder: Path, generation: str, index: Any, ids: Sequence[str | None], embeddings: np.ndarray) -> None:
    """``embeddings``, ``ids`` and the FAISS index of one generation, each written and fsynced."""
    import faiss
    import numpy as np

    files = paths(folder, generation)

    def save(path: Path) -> None:
        with open(path, "wb") as handle:
            np.save(handle, embeddings)

    mf.write_atomic(files["embeddings"], save)
    fault_point("compaction-writing")
    mf.write_json_atomic(files["ids"], list(ids))
    mf.write_atomic(files["index"], lambda tmp: faiss.write_index(index, str(tmp)))


def read_generation(folder: Path, manifest: dict[str, Any]) -> DenseState:
    """The state a manifest names: its generation's files, then its log replayed.

    IndexInconsistent (an IndexMismatchError) when the base files disagree in row count (an interrupted write of an older version).
    """
    import faiss
    import numpy as np

    info = manifest.get("info", {})
    generation = str(info.get("generation", ""))
    files = paths(folder, generation)
    index = faiss.read_index(str(files["index"]))
    ids = json.loads(files["ids"].read_text())
    emb = np.load(files["embeddings"])
    rows = info.get("base_rows", info.get("rows"))
    if not (len(ids) == emb.shape[0] == index.ntotal == (rows if rows is not None else len(ids))):
        raise IndexInconsistent(
            f"the dense index at {folder} is inconsistent (ids {len(ids)}, embeddings {emb.shape[0]}, "
            f"FAISS rows {index.ntotal}, manifest {rows}): an update was interrupted; {mf.REBUILD_HINT}"
        )
    state = DenseState(index, ids, emb, generation, info.get("built_as", "flat"))
    catch_up(state, files["log"])
    return state


def catch_up(state: DenseState, log: Path) -> None:
    """Apply records appended to ``log`` after the state's position (by another process, or before a crash)."""
    records, end = read_log(log, state.log_end)
    for record in records:
        state.apply(record)
    state.segments += len(records)
    state.log_end = end
