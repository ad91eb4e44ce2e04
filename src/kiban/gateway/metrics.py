"""Gateway metrics in Prometheus form (``kiban_`` prefix, base units).

With several workers, ``PROMETHEUS_MULTIPROC_DIR`` is set before any worker
starts and prometheus_client aggregates the per-process files, so /metrics
shows one view whichever worker answers.
"""

from __future__ import annotations

import os

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

from kiban.gateway.upstreams import Upstream

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
_TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    """Every metric the gateway records, registered once per process."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.multiprocess = "PROMETHEUS_MULTIPROC_DIR" in os.environ
        r = self.registry
        self.requests = Counter(
            "kiban_requests", "Requests answered", ["route", "engine", "status"], registry=r
        )
        self.duration = Histogram(
            "kiban_request_duration_seconds",
            "End-to-end request latency",
            ["route", "engine"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "kiban_time_to_first_token_seconds",
            "Time to the first streamed chunk",
            ["route", "engine"],
            buckets=_TTFT_BUCKETS,
            registry=r,
        )
        self.tokens = Counter(
            "kiban_tokens", "Tokens reported by engines", ["route", "engine", "type"], registry=r
        )
        self.chunks = Counter(
            "kiban_stream_chunks", "SSE events relayed", ["route", "engine"], registry=r
        )
        self.in_flight = Gauge(
            "kiban_in_flight_requests",
            "Requests being handled",
            ["route"],
            multiprocess_mode="livesum",
            registry=r,
        )
        self.retries = Counter(
            "kiban_retries", "Attempts on another engine after a failure", ["route"], registry=r
        )
        self.upstream_failures = Counter(
            "kiban_upstream_failures",
            "Failed attempts by reason",
            ["route", "engine", "reason"],
            registry=r,
        )
        self.engine_up = Gauge(
            "kiban_engine_up",
            "1 when the engine's health check passes",
            ["engine"],
            multiprocess_mode="livemax",
            registry=r,
        )
        self.circuit = Gauge(
            "kiban_engine_circuit_state",
            "Circuit breaker: 0 closed, 1 half-open, 2 open",
            ["engine"],
            multiprocess_mode="livemax",
            registry=r,
        )
        self.structured_outcomes = Counter(
            "kiban_structured_outcomes",
            "Structured-output attempts by outcome: valid, a verification failure "
            "(invalid_json, truncated, whitespace_runaway, schema_violation, ...), "
            "engine_rejected, unsupported",
            ["route", "engine", "outcome"],
            registry=r,
        )
        self.auth_rejections = Counter(
            "kiban_auth_rejections", "Requests refused for a missing or invalid key", registry=r
        )

    def engine_health(self, upstream: Upstream) -> None:
        self.engine_up.labels(upstream.name).set(1 if upstream.healthy else 0)
        self.circuit.labels(upstream.name).set(int(upstream.breaker.state))

    def render(self) -> bytes:
        if self.multiprocess:
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
            return generate_latest(registry)
        return generate_latest(self.registry)
