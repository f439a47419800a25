"""Property-based fuzzing of the HTTP API from its own ``/openapi.json`` with schemathesis.

The real app (``create_app``, with an API key and request limits) runs in-process over ASGI on the
fake pipelines of test_service_support.py. Schemathesis' engine runs every phase it runs from the
command line (coverage, fuzzing with valid and invalid inputs, stateful sequences) with a fixed
seed, over every operation, and all its default checks: no 5xx, status codes, content types and
bodies as documented, invalid input rejected, auth enforced. The number of requests it sent is
asserted (at least MIN_REQUESTS) and shown in the run's summary.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from test_service_support import build_index, register, write_pipeline

from streamrank.service.app import create_app
from streamrank.service.settings import Settings, load_settings

schemathesis = pytest.importorskip("schemathesis", reason="schemathesis is not installed (pip install -e '.[dev]')")

API_KEY = "fuzz-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
SEED = 20240611
MAX_EXAMPLES = 100
"""Per operation and phase; about 1,900 requests in all."""
MIN_REQUESTS = 1000
LIMITS = dict(max_query_chars=64, max_k=50, max_rerank_documents=4, max_upsert_documents=3)


@contextmanager
def started(settings: Settings) -> Iterator[Any]:
    """``create_app(settings)`` with its lifespan started (it stays up for the run) and ready."""
    from schemathesis.python import asgi

    application = create_app(settings)
    with asgi.get_client(application) as client:
        for _ in range(1500):
            if client.get("/readyz", headers=AUTH).status_code == 200:
                break
            time.sleep(0.02)
        else:
            pytest.fail(f"the fuzzed app did not become ready: {client.get('/readyz', headers=AUTH).text}")
    try:
        yield application
    finally:
        asgi.shutdown_lifespans()


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """The app over two fake pipelines sharing one index, started (lifespan) and ready."""
    with pytest.MonkeyPatch.context() as mp:
        register(mp)
        root: Path = tmp_path_factory.mktemp("service-fuzz")
        fake, other = write_pipeline(root, "fake"), write_pipeline(root, "other")
        build_index(fake, root / "index")
        settings = load_settings(
            env={}, pipelines=[str(fake), str(other)], index_dir=str(root / "index"), warmup=False, api_key=API_KEY,
            **LIMITS,
        )
        with started(settings) as application:
            yield application


def fuzz(app: Any, max_examples: int = MAX_EXAMPLES) -> dict[str, Any]:
    """Run schemathesis' engine against ``app``; requests by operation and status, failures, phases."""
    from schemathesis.engine import events, from_schema

    config = schemathesis.Config.from_dict(
        {
            "seed": SEED,
            "suppress-health-check": ["too_slow"],  # depends on the machine's load, not on the API
            "headers": AUTH,
            "generation": {"mode": "all", "max-examples": max_examples, "deterministic": True, "database": "none"},
        }
    )
    schema = schemathesis.openapi.from_asgi("/openapi.json", app, config=config)
    operations: Counter[str] = Counter()
    statuses: Counter[int] = Counter()
    server_errors: list[str] = []

    @schema.hook
    def after_call(context: Any, case: Any, response: Any) -> None:
        operations[f"{case.method.upper()} {case.path}"] += 1
        statuses[response.status_code] += 1
        if response.status_code >= 500:
            server_errors.append(f"{response.status_code} {case.as_curl_command()}\n{response.text[:500]}")

    failures: list[str] = []
    phases: Counter[str] = Counter()
    started = time.perf_counter()
    for event in from_schema(schema).execute():
        if isinstance(event, events.ScenarioFinished):
            phases[event.phase.value] += len(event.recorder.interactions)
            for nodes in event.recorder.checks.values():
                failures += [
                    f"{n.failure_info.failure.operation}: {n.failure_info.failure.title}: "
                    f"{n.failure_info.failure.message}\n{n.failure_info.code_sample}"
                    for n in nodes
                    if n.failure_info is not None
                ]
        elif isinstance(event, events.NonFatalError):
            failures.append(f"{event.label}: {event.info.format()}")
        elif isinstance(event, events.FatalError):
            raise event.exception
    return {
        "requests": sum(operations.values()),
        "operations": operations,
        "statuses": statuses,
        "phases": phases,
        "server_errors": server_errors,
        "failures": sorted(set(failures)),
        "seconds": time.perf_counter() - started,
    }


OPERATIONS = {
    "POST /search", "POST /v1/rerank", "POST /v2/rerank", "POST /documents", "GET /documents/{doc_id}",
    "DELETE /documents/{doc_id}", "DELETE /documents", "GET /pipelines", "GET /healthz", "GET /readyz", "GET /metrics",
}


def check(result: dict[str, Any], what: str, summary_line: Callable[[str], None]) -> None:
    """Report a fuzz run in the summary and assert: no 5xx, no failed check, enough requests, every operation."""
    documented = sorted(op for op, n in result["operations"].items() if n > 1)
    line = (
        f"schemathesis {schemathesis.__version__} fuzz of /openapi.json ({what}): {result['requests']} requests "
        f"({', '.join(f'{p} {n}' for p, n in sorted(result['phases'].items()) if n)}) over {len(documented)} operations, "
        f"statuses {dict(sorted(result['statuses'].items()))}, {len(result['server_errors'])} 5xx, "
        f"{len(result['failures'])} check failures, {result['seconds']:.1f} s"
    )
    summary_line(line)
    assert not result["server_errors"], line + "\n" + "\n\n".join(result["server_errors"][:5])
    assert not result["failures"], line + "\n" + "\n\n".join(result["failures"][:5])
    assert result["requests"] >= MIN_REQUESTS, line
    assert OPERATIONS <= set(documented), line


@pytest.mark.slow
def test_fuzz_openapi_no_server_errors(
    app: Any, summary_line: Callable[[str], None], record_property: Callable[[str, object], None]
) -> None:
    result = fuzz(app)
    record_property("fuzz_requests", result["requests"])
    check(result, "fake pipelines", summary_line)
