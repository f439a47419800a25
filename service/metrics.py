"""Prometheus metrics of one app instance (its own registry, so several apps can live in one process)."""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
"""Methods counted under their own name; any other (clients can send any token) counts as ``other``."""
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class Metrics:
    """Requests, errors, latency per route and per pipeline stage, batch sizes, degraded answers."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "streamrank_requests", "HTTP requests answered", ["method", "route", "status"], registry=r
        )
        self.errors = Counter(
            "streamrank_errors", "HTTP requests answered with a 4xx or 5xx status", ["route", "status"], registry=r
        )
        self.latency = Histogram(
            "streamrank_request_seconds", "HTTP request latency", ["route"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.stage_latency = Histogram(
            "streamrank_stage_seconds",
            "Wall time of one pipeline stage over one batch",
            ["pipeline", "stage"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "streamrank_batch_size",
            "Requests fused into one pipeline call",
            ["pipeline", "kind"],
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.degraded = Counter(
            "streamrank_degraded", "Answers cut short by a deadline (earlier stage returned)", ["pipeline"], registry=r
        )
        self.documents_written = Counter(
            "streamrank_documents_written", "Documents upserted or deleted", ["operation"], registry=r
        )
        self.ready = Gauge("streamrank_ready", "1 once every pipeline is loaded and warm", registry=r)
        self.writable = Gauge(
            "streamrank_writable", "1 while every index folder can be written (checked by /readyz and writes)",
            registry=r,
        )
        self.quarantined = Gauge(
            "streamrank_quarantined_documents",
            "Stored documents an index refused at startup recovery (listed with their ids in /readyz)",
            ["pipeline"],
            registry=r,
        )
        self.write_errors = Counter(
            "streamrank_write_errors",
            "Document writes refused or failed: refused (an index rejected a document), full, read_only, io",
            ["reason"],
            registry=r,
        )

    def observe_request(self, method: str, route: str, status: int, seconds: float) -> None:
        """Count one answered request (the method label is bounded: unknown methods are ``other``)."""
        method = method if method in METHODS else "other"
        self.requests.labels(method, route, str(status)).inc()
        self.latency.labels(route).observe(seconds)
        if status >= 400:
            self.errors.labels(route, str(status)).inc()

    def batch_observer(self, pipeline: str, kind: str):
        """A callback for one runner: records batch size and the time each stage took."""
        sizes = self.batch_size.labels(pipeline, kind)

        def observe(size: int, timings_ms: dict[str, float]) -> None:
            sizes.observe(size)
            for stage, ms in timings_ms.items():
                self.stage_latency.labels(pipeline, stage).observe(ms / 1000.0)

        return observe

    def render(self) -> bytes:
        return generate_latest(self.registry)
