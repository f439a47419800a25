"""The app in-process (FastAPI's TestClient) over the fake pipelines of test_service_support.py.

Helpers for test_service.py and test_service_requests.py; their ``setup`` and ``client`` fixtures are in conftest.py.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from types import SimpleNamespace

from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from streamrank.service.app import create_app
from streamrank.service.settings import Settings, load_settings

LIMITS = dict(max_query_chars=64, max_k=50, max_rerank_documents=4, max_upsert_documents=2, max_body_bytes=8192)


def make_settings(setup: SimpleNamespace, pipelines: tuple[str, ...] = ("fake", "slow"), **overrides) -> Settings:
    """Settings serving ``pipelines`` of ``setup`` over its index (no warm-up), with ``overrides``."""
    base = dict(pipelines=[str(getattr(setup, p)) for p in pipelines], index_dir=str(setup.index), warmup=False)
    return load_settings(env=overrides.pop("env", {}), **{**base, **overrides})


@contextmanager
def running(settings: Settings, headers: dict[str, str] | None = None) -> Iterator[TestClient]:
    """A started TestClient on ``create_app(settings)``, once ready (or after about 6 s)."""
    with TestClient(create_app(settings)) as client:
        for _ in range(300):
            if client.get("/readyz", headers=headers).status_code == 200:
                break
            time.sleep(0.02)
        yield client


def metric(text: str, name: str, **labels: str) -> float:
    """The value of sample ``name`` with ``labels`` in Prometheus ``text``."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    raise AssertionError(f"{name} {labels} not in metrics")
