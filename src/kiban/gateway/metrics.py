"""Gateway metrics in Prometheus form: ``kiban_`` prefix, base units, ``_total`` counters.

Every name the gateway exports is defined here, and docs/observability.md
lists them. The hot path never calls ``.labels()``: each (route, engine) pair
gets a :class:`Series` of label children bound once and cached, so recording
one request costs a dict lookup and a few ``inc``/``observe`` calls (measured
by ``bench/metrics_cost.py``).

With several workers, ``PROMETHEUS_MULTIPROC_DIR`` is set before any worker
starts and prometheus_client aggregates the per-process files, so /metrics
shows one view whichever worker answers. Gauges say how workers combine:
``livesum`` for in-flight requests, ``livemax``/``livemin`` for health as
each worker's own checker sees it, ``mostrecent`` for what the supervisor sets.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from kiban.gateway.engines import Engine
    from kiban.gateway.proxy import Exchange
    from kiban.gateway.routing import Route

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1, 2.5)

#: label value for requests that never reached an engine (no route target, auth, 4xx of ours)
NO_ENGINE = "none"


class Series:
    """Label children of one (route, engine) pair, bound once."""

    __slots__ = (
        "_engine",
        "_requests",
        "_route",
        "_status",
        "chunks",
        "completion_tokens",
        "duration",
        "failovers",
        "itl",
        "prompt_tokens",
        "ttft",
    )

    def __init__(self, m: Metrics, route: str, engine: str) -> None:
        self._requests = m.requests
        self._status: dict[int, Any] = {}
        labels = (route, engine)
        self.duration = m.duration.labels(*labels)
        self.ttft = m.ttft.labels(*labels)
        self.itl = m.itl.labels(*labels)
        self.chunks = m.chunks.labels(*labels)
        self.prompt_tokens = m.tokens.labels(*labels, "prompt")
        self.completion_tokens = m.tokens.labels(*labels, "completion")
        self.failovers = m.failovers.labels(*labels)
        self._route, self._engine = route, engine

    def requests(self, status: int) -> Any:
        child = self._status.get(status)
        if child is None:
            child = self._requests.labels(self._route, self._engine, str(status))
            self._status[status] = child
        return child


class Metrics:
    """Every metric the gateway records, registered once per process."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.multiprocess = "PROMETHEUS_MULTIPROC_DIR" in os.environ
        self._extra_collectors: list[Collector] = []
        self._series: dict[tuple[str, str], Series] = {}
        self._in_flight: dict[str, Any] = {}
        self._outcomes: dict[tuple[str, str], Any] = {}
        self._results: dict[tuple[str, str], Any] = {}
        self._retried: dict[tuple[str, str], Any] = {}
        self._tallies: list[_Tally] = []
        r = self.registry
        route_engine = ["route", "engine"]
        self.requests = Counter(
            "kiban_requests",
            "Requests answered, by route, engine that answered and HTTP status",
            ["route", "engine", "status"],
            registry=r,
        )
        self.duration = Histogram(
            "kiban_request_duration_seconds",
            "End-to-end request latency as the gateway sees it",
            route_engine,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "kiban_time_to_first_token_seconds",
            "Time from request arrival to the first streamed chunk",
            route_engine,
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "kiban_inter_token_latency_seconds",
            "Mean gap between streamed events of one response, one observation per stream",
            route_engine,
            buckets=ITL_BUCKETS,
            registry=r,
        )
        self.tokens = Counter(
            "kiban_tokens",
            "Tokens the engines reported in usage, by type (prompt, completion)",
            ["route", "engine", "type"],
            registry=r,
        )
        self.chunks = Counter(
            "kiban_stream_chunks", "SSE events relayed to clients", route_engine, registry=r
        )
        self.in_flight = Gauge(
            "kiban_in_flight_requests",
            "Requests being handled",
            ["route"],
            multiprocess_mode="livesum",
            registry=r,
        )
        self.retries = Counter(
            "kiban_retries",
            "Attempts after a failed one (the same engine or another), by the failure's reason",
            ["route", "reason"],
            registry=r,
        )
        self.failovers = Counter(
            "kiban_failovers",
            "Requests answered by an engine after an earlier engine failed them",
            route_engine,
            registry=r,
        )
        self.engine_failures = Counter(
            "kiban_upstream_failures",
            "Failed attempts by reason (connect, timeout, status, broken, context_length, "
            "invalid_output, rejected)",
            ["route", "engine", "reason"],
            registry=r,
        )
        self.stream_continuations = Counter(
            "kiban_stream_continuations",
            "Broken streams continued on another engine, by outcome (continued, broken, "
            "failed, unavailable)",
            ["route", "from_engine", "to_engine", "outcome"],
            registry=r,
        )
        self.engine_up = Gauge(
            "kiban_engine_up",
            "1 when the engine's health check passes",
            ["engine"],
            multiprocess_mode="livemin",
            registry=r,
        )
        self.circuit = Gauge(
            "kiban_engine_circuit_state",
            "Circuit breaker: 0 closed, 1 half-open, 2 open",
            ["engine"],
            multiprocess_mode="livemax",
            registry=r,
        )
        self.route_healthy = Gauge(
            "kiban_route_healthy_engines",
            "Engines of the route whose health check passes",
            ["route"],
            multiprocess_mode="livemin",
            registry=r,
        )
        self.gpu_verified = Gauge(
            "kiban_engine_gpu_verified",
            "GPU policy: 1 when the managed engine is verified on its GPU, 0 when not",
            ["engine"],
            multiprocess_mode="mostrecent",
            registry=r,
        )
        self.auth_rejections = Counter(
            "kiban_auth_rejections", "Requests refused for a missing or invalid key", registry=r
        )
        self.rate_limit_rejections = Counter(
            "kiban_rate_limit_rejections",
            "Requests refused with 429 by a kiban limit, by route and limit",
            ["route", "limit"],
            registry=r,
        )
        self.shared_state_errors = Counter(
            "kiban_shared_state_errors",
            "Operations on the shared state (Redis) that failed; the request went on without it",
            ["operation"],
            registry=r,
        )
        self.reloads = Counter(
            "kiban_config_reloads",
            "Configuration reloads by outcome (applied, rejected)",
            ["outcome"],
            registry=r,
        )
        self.structured_outcomes = Counter(
            "kiban_structured_outcomes",
            "Structured-output attempts by route and verification outcome",
            ["route", "outcome"],
            registry=r,
        )
        self.affinity_decisions = Counter(
            "kiban_route_affinity_decisions",
            "Choices of the cache_aware and session strategies by outcome (hit, miss, guard, "
            "no_prefix; sticky, moved, no_key)",
            ["route", "outcome"],
            registry=r,
        )
        self.prefix_evictions = Counter(
            "kiban_route_prefix_evictions",
            "Prompt prefixes the cache_aware strategy dropped from its full index",
            ["route"],
            registry=r,
        )
        self.structured_results = Counter(
            "kiban_structured_requests",
            "Structured-output requests by route and how they were answered: enforced, "
            "validated, or the error code (the x-kiban-structured header)",
            ["route", "result"],
            registry=r,
        )

    # -- hot path --------------------------------------------------------------------------

    def series(self, route: str, engine: str) -> Series:
        """The bound children of (route, engine), created on first use."""
        key = (route, engine)
        found = self._series.get(key)
        if found is None:
            found = self._series[key] = Series(self, route, engine)
        return found

    def in_flight_for(self, route: str) -> Any:
        """The bound in-flight gauge of *route*."""
        child = self._in_flight.get(route)
        if child is None:
            child = self._in_flight[route] = self.in_flight.labels(route)
        return child

    def observe_exchange(self, route: str, ex: Exchange, elapsed_s: float) -> None:
        """Record one finished request: status, latencies, tokens, failover."""
        s = self.series(route, ex.engine or NO_ENGINE)
        s.requests(ex.status).inc()
        s.duration.observe(elapsed_s)
        if ex.ttft_s is not None:
            s.ttft.observe(ex.ttft_s)
            s.chunks.inc(ex.chunks)
            if ex.itl_s is not None:
                s.itl.observe(ex.itl_s)
        usage = ex.usage
        if usage:
            prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
            if type(prompt) is int:
                s.prompt_tokens.inc(prompt)
            if type(completion) is int:
                s.completion_tokens.inc(completion)
        if ex.attempts > 1 and ex.status < 500:
            s.failovers.inc()

    # -- events off the hot path -------------------------------------------------------------

    def prepare(self, routes: Iterable[Route]) -> None:
        """Create every (route, engine) series at zero, so rates and increases count from 0.

        Status 200 is created too: a counter that first appears at N hides
        those N from Prometheus' ``increase()``.
        """
        self.publish_tallies()  # what the routes being replaced counted since the last time
        self._tallies = []
        for route in routes:
            self.in_flight_for(route.name)
            for target in route.targets:
                self.series(route.name, target.engine.name).requests(200)
            self._watch_affinity(route)

    def _watch_affinity(self, route: Route) -> None:
        """Publish a cache_aware or session strategy's counts (its counters created at zero)."""
        strategy = route.request_order
        if strategy is None:
            return
        decisions = [self.affinity_decisions.labels(route.name, o) for o in strategy.OUTCOMES]
        self._tallies.append(_Tally(lambda: strategy.decisions, decisions))
        if hasattr(strategy, "evictions"):  # cache_aware
            evictions = [self.prefix_evictions.labels(route.name)]
            self._tallies.append(_Tally(lambda: [strategy.evictions], evictions))

    def publish_tallies(self) -> None:
        """Add what the routing strategies counted since the last call to their counters.

        The strategies count in plain ints (a Prometheus ``inc`` costs about
        4,000 instructions); this runs before each exposition, every second
        (``Gateway``), and before a reload or shutdown drops the routes.
        """
        for tally in self._tallies:
            tally.publish()

    def structured_outcome(self, route: str, outcome: str) -> None:
        """Count one structured-output verification outcome (the structured module's names)."""
        key = (route, outcome)
        child = self._outcomes.get(key)
        if child is None:
            child = self._outcomes[key] = self.structured_outcomes.labels(route, outcome)
        child.inc()

    def structured_result(self, route: str, result: str) -> None:
        """Count one structured-output request by how it was answered."""
        key = (route, result)
        child = self._results.get(key)
        if child is None:
            child = self._results[key] = self.structured_results.labels(route, result)
        child.inc()

    def retried(self, route: str, reason: str) -> None:
        """Count one attempt made after a failed one whose reason was *reason*."""
        key = (route, reason)
        child = self._retried.get(key)
        if child is None:
            child = self._retried[key] = self.retries.labels(route, reason)
        child.inc()

    def rate_limited(self, route: str, limit: str) -> None:
        """Count one request refused with 429 by the kiban limit named *limit*."""
        self.rate_limit_rejections.labels(route, limit).inc()

    def shared_state_error(self, operation: str) -> None:
        """Count one failed shared-state operation (admit, settle, circuit_publish, ...)."""
        self.shared_state_errors.labels(operation).inc()

    def engine_health(self, engine: Engine) -> None:
        self.engine_up.labels(engine.name).set(1 if engine.healthy else 0)
        self.circuit.labels(engine.name).set(int(engine.breaker.state))

    def routes_health(self, routes: Iterable[Route]) -> None:
        for route in routes:
            healthy = sum(1 for t in route.targets if t.engine.healthy)
            self.route_healthy.labels(route.name).set(healthy)

    def set_gpu_verified(self, engine: str, verified: bool) -> None:
        """The supervisor's verdict on *engine*: runs on the GPU it was given (1) or not (0)."""
        self.gpu_verified.labels(engine).set(1 if verified else 0)

    # -- exposition --------------------------------------------------------------------------

    def add_collector(self, collector: Collector) -> None:
        """A collector read at scrape time (the NVML GPU exporter), in every worker."""
        self._extra_collectors.append(collector)
        if not self.multiprocess:
            self.registry.register(collector)

    def render(self, view: str = "public") -> bytes:
        """The exposition: ``public`` (/metrics), ``private`` (per-key series only), ``all``."""
        self.publish_tallies()
        sources: list[Any]
        if self.multiprocess:
            sources = [multiprocess.MultiProcessCollector(None), *self._extra_collectors]
        else:
            sources = [self.registry]
        registry = CollectorRegistry()
        registry.register(_View(sources, view))
        return generate_latest(registry)

    def close(self) -> None:
        """Publish the last counts; tell the multiprocess files this worker is gone."""
        self.publish_tallies()
        if self.multiprocess:
            multiprocess.mark_process_dead(os.getpid())


class _Tally:
    """Counts a routing strategy keeps in plain ints, and the counters they are published to."""

    def __init__(self, read: Callable[[], list[int]], counters: list[Any]) -> None:
        self.read = read
        self.counters = counters
        self.published = [0] * len(counters)

    def publish(self) -> None:
        for i, count in enumerate(self.read()):
            if count != self.published[i]:
                self.counters[i].inc(count - self.published[i])
                self.published[i] = count


#: metric families that carry API key names: never on the public /metrics
PRIVATE_PREFIX = "kiban_key_"


class _View(Collector):
    """The families of *sources* that belong on one view (public, private or all)."""

    def __init__(self, sources: list[Any], view: str) -> None:
        self.sources = sources
        self.view = view

    def collect(self) -> Iterable[Any]:
        for source in self.sources:
            for family in source.collect():
                private = family.name.startswith(PRIVATE_PREFIX)
                if self.view == "all" or private == (self.view == "private"):
                    yield family
