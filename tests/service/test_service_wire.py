"""Errors cross deployments by class (``streamrank.service.wire``): the same class, message and
attributes on the other side of a pickle, so handlers and retries match on the type, never on text."""

from __future__ import annotations

import pickle

import pytest

from streamrank.errors import IndexInconsistent, IndexMismatchError, StreamRankError
from streamrank.pipeline import DocumentsRefused
from streamrank.service.batching import ServiceUnavailable
from streamrank.service.wire import Raised, answer, unwrap
from streamrank.store import StorageError


def across(exc: BaseException) -> BaseException:
    return pickle.loads(pickle.dumps(Raised.of(exc))).rebuild()


def test_typed_errors_keep_class_message_and_attributes() -> None:
    storage = across(StorageError("the disk is full", "full", "/data/docs.sqlite"))
    assert type(storage) is StorageError and str(storage) == "the disk is full"
    assert (storage.problem, storage.where) == ("full", "/data/docs.sqlite")
    refused = across(DocumentsRefused("bm25", ["a", "b"], "id too long"))
    assert type(refused) is DocumentsRefused and refused.doc_ids == ["a", "b"] and "refused" in str(refused)
    inconsistent = across(IndexInconsistent("ids 3, rows 4"))
    assert isinstance(inconsistent, IndexMismatchError) and type(inconsistent) is IndexInconsistent
    assert type(across(ServiceUnavailable("no replica"))) is ServiceUnavailable


def test_an_exception_that_cannot_cross_becomes_a_streamrank_error() -> None:
    class Local(Exception):  # not importable by name on the other side
        pass

    rebuilt = across(Local("local only"))
    assert type(rebuilt) is StreamRankError and "local only" in str(rebuilt)


def test_answer_and_unwrap() -> None:
    assert unwrap(answer(lambda: 3)) == 3
    failed = answer(lambda: 1 / 0)
    assert isinstance(failed, Raised)
    with pytest.raises(ZeroDivisionError):
        unwrap(failed)
