"""Circuit breakers that open or close: in the metrics and log at once, and in other replicas."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import Any

from kiban.gateway.metrics import Metrics
from kiban.gateway.upstreams import Circuit, Upstream

log = logging.getLogger("kiban.gateway")


class CircuitWatch:
    """Hooks every engine's breaker; with shared state, passes changes to and from replicas."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self.shared: Any = None  # the RedisState, once started with gateway.shared_state

    def watch(self, upstreams: Iterable[Upstream]) -> None:
        """Hook the breakers of *upstreams* that are not hooked yet (new after a reload)."""
        for upstream in upstreams:
            if upstream.breaker.on_change is None:
                upstream.breaker.on_change = lambda state, u=upstream: self._changed(u, state)

    def _changed(self, upstream: Upstream, state: Circuit) -> None:
        self.metrics.engine_health(upstream)
        if state is Circuit.OPEN:
            log.warning(
                "engine %s: circuit open (ejected for %g s)",
                upstream.name,
                upstream.breaker.cooldown_s,
            )
        else:
            log.info("engine %s: circuit closed (admitted again)", upstream.name)
        if self.shared is not None:
            self.shared.circuit_changed(upstream.name, state, upstream.breaker.cooldown_s)

    def apply_remote(self, upstream: Upstream | None, state: Circuit, remaining_s: float) -> None:
        """Another replica's breaker for *upstream* changed: follow it here."""
        if upstream is not None:
            upstream.breaker.apply_remote(state, remaining_s, time.monotonic())
            self.metrics.engine_health(upstream)
