"""Live state of each engine: health, circuit breaker, outstanding requests, latency."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from enum import IntEnum

from kiban.config import EngineConfig
from kiban.engines import ENGINE_KINDS, EngineKind
from kiban.gateway.upstream_http import Pool
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
    a failed probe re-opens it for another cooldown.
    """

    failures_to_open: int = 3
    cooldown_s: float = 5.0
    state: Circuit = Circuit.CLOSED
    consecutive_failures: int = 0
    opened_at: float = 0.0
    probe_in_flight: bool = False

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
        self.state = Circuit.CLOSED
        self.consecutive_failures = 0
        self.probe_in_flight = False

    def on_failure(self, now: float) -> None:
        self.consecutive_failures += 1
        if self.state is Circuit.HALF_OPEN or self.consecutive_failures >= self.failures_to_open:
            self.state = Circuit.OPEN
            self.opened_at = now
            self.probe_in_flight = False


@dataclass
class Upstream:
    """One engine as the gateway sees it."""

    config: EngineConfig
    kind: EngineKind
    breaker: CircuitBreaker
    structured: StructuredCapability = field(default_factory=StructuredCapability)
    healthy: bool = True
    outstanding: int = 0
    ewma_latency_s: float = 0.0
    last_health_error: str | None = None
    http: Pool | None = field(default=None, repr=False)  # set when the gateway starts
    #: header lines sent to this engine with every request (content type, its own key)
    request_headers: bytes = b""
    _ewma_alpha: float = field(default=0.3, repr=False)

    @classmethod
    def from_config(cls, config: EngineConfig) -> Upstream:
        breaker = CircuitBreaker(config.circuit.failures, config.circuit.cooldown_s)
        kind = ENGINE_KINDS[config.kind]
        headers = b"content-type: application/json\r\naccept-encoding: identity\r\n"
        if config.api_key:
            headers += b"authorization: Bearer " + config.api_key.encode("latin-1") + b"\r\n"
        return cls(
            config=config,
            kind=kind,
            breaker=breaker,
            structured=kind.structured_capability(config),
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
        return self.kind.supports_images if declared is None else declared

    def available(self, now: float | None = None) -> bool:
        """Healthy, circuit allowing a request, and below its concurrency limit."""
        if not self.healthy or self.outstanding >= self.config.max_concurrency:
            return False
        return self.breaker.allows(time.monotonic() if now is None else now)

    def observe_latency(self, seconds: float) -> None:
        if self.ewma_latency_s == 0.0:
            self.ewma_latency_s = seconds
        else:
            a = self._ewma_alpha
            self.ewma_latency_s = a * seconds + (1 - a) * self.ewma_latency_s

    def on_health(self, ok: bool, error: str | None = None) -> None:
        """Result of an active health check.

        A passing check does not close an open circuit: the engine may answer
        /health and still fail requests. The breaker's own half-open probe,
        after its cooldown, decides when real traffic returns.
        """
        self.healthy = ok
        self.last_health_error = error
