"""Sharding a corpus by document id: the stable hash that picks a document's shard, the merge of the
shards' top-k lists, and a view of the document store restricted to one shard.

No stage and no front end lives here: :mod:`streamrank.index.sharded_stage` (the ``shards = N``
retriever) and the Ray shard actors of the service both build on these functions, so an in-process
sharded index and one served by actors split and merge alike.

- :func:`shard_of` is BLAKE2b-64 of the id's UTF-8 bytes (lone surrogates kept), modulo the shard
  count: the same id lands on the same shard in every process, run and Python version (Python's own
  ``hash`` of a string is salted per process and would not).
- :func:`merge_top_k` merges per-shard lists that are each sorted best first into the best ``k``.
  Ties (equal scores) go to the smaller document id, so the merged order does not depend on which
  shard answered first.
"""

from __future__ import annotations

import hashlib
import heapq
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, TypeVar

from streamrank.types import Document

if TYPE_CHECKING:
    from streamrank.store import DocumentStore

T = TypeVar("T")
Hit = tuple[str, float]


def shard_of(doc_id: str, shards: int) -> int:
    """The shard (0 .. shards-1) that owns ``doc_id``: stable across processes and runs."""
    if shards < 1:
        raise ValueError(f"shards must be at least 1, got {shards}")
    if shards == 1:
        return 0
    digest = hashlib.blake2b(doc_id.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % shards


def split_by_shard(items: Iterable[T], shards: int, key: Callable[[T], str]) -> dict[int, list[T]]:
    """``items`` grouped by the shard owning ``key(item)``, each group in input order (empty shards absent)."""
    groups: dict[int, list[T]] = {}
    for item in items:
        groups.setdefault(shard_of(key(item), shards), []).append(item)
    return groups


def merge_top_k(lists: Sequence[Sequence[Hit]], k: int) -> list[Hit]:
    """The best ``k`` (doc id, score) of several lists, each best first; ties by ascending doc id.

    An id found in several lists (it should not be: shards are disjoint) is kept once, at its best score.
    """
    merged: list[Hit] = []
    seen: set[str] = set()
    ordered = [sorted(hits, key=_order) for hits in lists]  # shards sort by score; ids break ties here
    for doc_id, score in heapq.merge(*ordered, key=_order):
        if doc_id in seen:
            continue
        seen.add(doc_id)
        merged.append((doc_id, score))
        if len(merged) == k:
            break
    return merged


def _order(hit: Hit) -> tuple[float, str]:
    return (-hit[1], hit[0])


class ShardStore:
    """The documents of one shard, read from the pipeline's one document store.

    Offers what index stages read from a store (``ids``, iteration, ``len``, ``in``, ``get``,
    ``get_many``, ``checksum``), each restricted to the documents the shard owns, so a shard's index
    manifest records its own part of the corpus. Writes go to the real store, never through a view.
    """

    def __init__(self, store: DocumentStore, shard: int, shards: int) -> None:
        self.store, self.shard, self.shards = store, shard, shards

    def owns(self, doc_id: str) -> bool:
        return shard_of(doc_id, self.shards) == self.shard

    def ids(self) -> list[str]:
        return [doc_id for doc_id in self.store.ids() if self.owns(doc_id)]

    def __iter__(self) -> Iterator[Document]:
        return (doc for doc in self.store if self.owns(doc.id))

    def __len__(self) -> int:
        return len(self.ids())

    def __contains__(self, doc_id: object) -> bool:
        return isinstance(doc_id, str) and self.owns(doc_id) and doc_id in self.store

    def get(self, doc_id: str) -> Document | None:
        return self.store.get(doc_id) if self.owns(doc_id) else None

    def get_many(self, doc_ids: Sequence[str]) -> dict[str, Document]:
        return self.store.get_many([doc_id for doc_id in doc_ids if self.owns(doc_id)])

    def checksum(self) -> str:
        """The corpus checksum of this shard's documents (``DocumentStore.checksum``'s definition)."""
        from streamrank.index.manifest import materialize

        return materialize(self)[1]
