"""Fixtures of the in-process service tests: fake pipelines with a built index, and a ready app.

Both are per test module (module scope); a module that defines its own ``setup`` or ``client`` uses that one.
"""

from __future__ import annotations

from collections.abc import Iterator
from types import SimpleNamespace

import pytest
from fastapi.testclient import TestClient
from service_client import LIMITS, make_settings, running
from test_service_support import build_index, register, write_pipeline


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimpleNamespace]:
    with pytest.MonkeyPatch.context() as mp:
        register(mp)
        root = tmp_path_factory.mktemp("service")
        ns = SimpleNamespace(
            root=root,
            index=root / "index",
            fake=write_pipeline(root, "fake"),
            slow=write_pipeline(root, "slow", slow=1.0),
            batchy=write_pipeline(root, "batchy", delay=0.2),
        )
        build_index(ns.fake, ns.index)
        yield ns


@pytest.fixture(scope="module")
def client(setup: SimpleNamespace) -> Iterator[TestClient]:
    with running(make_settings(setup, **LIMITS)) as c:
        yield c
