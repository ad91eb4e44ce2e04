"""Live state of each engine: health, circuit breaker, outstanding requests, latency."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import IntEnum

from kiban.config import EngineConfig
from kiban.engines import ENGINE_KINDS
from kiban.engines.dialect import Dialect
from kiban.engines.telemetry import EngineMetrics
from kiban.gateway.engine_client import Pool
from kiban.structured.capability import StructuredCapability


class Circuit(IntEnum):
    """Circuit-breaker states; the value is what the metrics report."""

    CLOSED = 0
    HALF_OPEN = 1
    OPEN = 2


@dataclass
class CircuitBreaker:
    """Consecutive failures open the circuit; after a cooldown one probe may pass.

    A successful probe (a request or an active health check) closes it again;
    a failed probe re-opens it for another cooldown. ``on_change`` hears of
    every opening and closing (shared state tells the other replicas).
    """

    failures_to_open: int = 3
    cooldown_s: float = 5.0
    state: Circuit = Circuit.CLOSED
    consecutive_failures: int = 0
    opened_at: float = 0.0
    probe_in_flight: bool = False
    on_change: Callable[[Circuit], None] | None = field(default=None, repr=False)

    def allows(self, now: float) -> bool:
        if self.state is Circuit.CLOSED:
            return True
        if self.state is Circuit.OPEN and now - self.opened_at >= self.cooldown_s:
            self.state = Circuit.HALF_OPEN
            self.probe_in_flight = False
        return self.state is Circuit.HALF_OPEN and not self.probe_in_flight

    def on_attempt(self) -> None:
        if self.state is Circuit.HALF_OPEN:
            self.probe_in_flight = True

    def on_success(self) -> None:
        self.consecutive_failures = 0
        if self.state is not Circuit.CLOSED:
            self.state = Circuit.CLOSED
            self.probe_in_flight = False
            if self.on_change is not None:
                self.on_change(Circuit.CLOSED)

    def on_failure(self, now: float) -> None:
        self.consecutive_failures += 1
        if self.state is Circuit.HALF_OPEN or self.consecutive_failures >= self.failures_to_open:
            was_open = self.state is Circuit.OPEN
            self.state = Circuit.OPEN
            self.opened_at = now
            self.probe_in_flight = False
            if self.on_change is not None and not was_open:
                self.on_change(Circuit.OPEN)

    def apply_remote(self, state: Circuit, remaining_s: float, now: float) -> None:
        """Another replica opened (for *remaining_s* more) or closed this circuit."""
        if state is Circuit.OPEN:
            self.state = Circuit.OPEN
            self.opened_at = now - max(0.0, self.cooldown_s - remaining_s)
            self.probe_in_flight = False
        elif self.state is not Circuit.CLOSED:
            self.state = Circuit.CLOSED
            self.consecutive_failures = 0
            self.probe_in_flight = False


@dataclass
class Engine:
    """One engine as the gateway sees it.

    ``outstanding`` counts the request slots taken, at most ``max_concurrency``.
    A request that finds every engine of its route full may wait in one
    engine's queue (at most ``max_queue`` waiters, each at most
    ``queue_timeout_s``); a released slot passes straight to the first waiter.
    """

    config: EngineConfig
    #: how the engine speaks HTTP (paths, errors, structured output, continuation)
    dialect: Dialect
    #: where the engine serves its load metrics, and their names
    metrics: EngineMetrics
    breaker: CircuitBreaker
    structured: StructuredCapability = field(default_factory=StructuredCapability)
    healthy: bool = True
    outstanding: int = 0
    #: the engine's own load (queue, KV cache), scraped when enabled (gateway/engine_load.py)
    load_penalty: int = 0
    ewma_latency_s: float = 0.0
    last_health_error: str | None = None
    #: failed health checks in a row since the last passing one
    health_misses: int = 0
    #: whether any health check has run yet (the first one decides at once)
    health_checked: bool = False
    http: Pool | None = field(default=None, repr=False)  # set when the gateway starts
    #: header lines sent to this engine with every request (content type, its own key)
    request_headers: bytes = b""

    waiters: deque[asyncio.Future[None]] = field(default_factory=deque, repr=False)
    _ewma_alpha: float = field(default=0.3, repr=False)

    @classmethod
    def from_config(cls, config: EngineConfig) -> Engine:
        breaker = CircuitBreaker(config.circuit.failures, config.circuit.cooldown_s)
        kind = ENGINE_KINDS[config.kind]
        headers = b"content-type: application/json\r\naccept-encoding: identity\r\n"
        if config.api_key:
            headers += b"authorization: Bearer " + config.api_key.encode("latin-1") + b"\r\n"
        return cls(
            config=config,
            dialect=kind.dialect,
            metrics=kind.metrics,
            breaker=breaker,
            structured=kind.dialect.structured_capability(config),
            request_headers=headers,
        )

    def connect(self, loop: asyncio.AbstractEventLoop) -> None:
        """Open the engine's connection pool on the running loop (at gateway start)."""
        self.http = Pool(self.config.url, loop)

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def accepts_images(self) -> bool:
        declared = self.config.images
        return self.dialect.supports_images if declared is None else declared

    def available(self, now: float | None = None) -> bool:
        """Healthy, circuit allowing a request, and below its concurrency limit."""
        if not self.healthy or self.outstanding >= self.config.max_concurrency:
            return False
        return self.breaker.allows(time.monotonic() if now is None else now)

    def try_acquire(self) -> bool:
        """Take a request slot if one is free."""
        if self.outstanding >= self.config.max_concurrency:
            return False
        self.outstanding += 1
        return True

    def release(self) -> None:
        """Give a slot back: to the first request still waiting, else to the pool."""
        waiters = self.waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot passes on; outstanding stays
                return
        self.outstanding -= 1

    def can_queue(self) -> bool:
        return len(self.waiters) < self.config.max_queue

    async def wait_for_slot(self) -> bool:
        """Wait in this engine's queue for a slot; False after ``queue_timeout_s``."""
        waiter = asyncio.get_running_loop().create_future()
        self.waiters.append(waiter)
        try:
            async with asyncio.timeout(self.config.queue_timeout_s):
                await asyncio.shield(waiter)
        except TimeoutError:
            if waiter.done():
                return True  # the slot arrived as the timeout fired: it is ours
            self._leave(waiter)
            return False
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.release()  # a slot was handed to a request that is gone
            else:
                self._leave(waiter)
            raise
        return True

    def _leave(self, waiter: asyncio.Future[None]) -> None:
        waiter.cancel()
        with contextlib.suppress(ValueError):
            self.waiters.remove(waiter)

    def observe_latency(self, seconds: float) -> None:
        if self.ewma_latency_s == 0.0:
            self.ewma_latency_s = seconds
        else:
            a = self._ewma_alpha
            self.ewma_latency_s = a * seconds + (1 - a) * self.ewma_latency_s

    def on_health(
        self, ok: bool, error: str | None = None, *, misses_allowed: int = 0, refused: bool = False
    ) -> None:
        """Result of an active health check.

        A healthy engine leaves rotation after ``misses_allowed + 1`` failed checks in a
        row, so that one slow answer on a loaded machine does not eject it; a refused
        connection (nothing listens) and the very first check decide at once. One
        passing check brings it back. A passing check does not close an open circuit:
        the engine may answer /health and still fail requests. The breaker's own
        half-open probe, after its cooldown, decides when real traffic returns.
        """
        first, self.health_checked = not self.health_checked, True
        self.last_health_error = error
        if ok:
            self.health_misses = 0
            self.healthy = True
            return
        self.health_misses += 1
        if first or refused or self.health_misses > misses_allowed:
            self.healthy = False
