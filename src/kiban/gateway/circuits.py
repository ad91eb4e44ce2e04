"""Circuit breakers that open or close: in the metrics and log at once, and in other replicas."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import Any

from kiban.gateway.engines import Circuit, Engine
from kiban.gateway.metrics import Metrics

log = logging.getLogger("kiban.gateway")


class CircuitWatch:
    """Hooks every engine's breaker; with shared state, passes changes to and from replicas."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self.shared: Any = None  # the RedisState, once started with gateway.shared_state

    def watch(self, engines: Iterable[Engine]) -> None:
        """Hook the breakers of *upstreams* that are not hooked yet (new after a reload)."""
        for engine in engines:
            if engine.breaker.on_change is None:
                engine.breaker.on_change = lambda state, u=engine: self._changed(u, state)

    def _changed(self, engine: Engine, state: Circuit) -> None:
        self.metrics.engine_health(engine)
        if state is Circuit.OPEN:
            log.warning(
                "engine %s: circuit open (ejected for %g s)",
                engine.name,
                engine.breaker.cooldown_s,
            )
        else:
            log.info("engine %s: circuit closed (admitted again)", engine.name)
        if self.shared is not None:
            self.shared.circuit_changed(engine.name, state, engine.breaker.cooldown_s)

    def apply_remote(self, engine: Engine | None, state: Circuit, remaining_s: float) -> None:
        """Another replica's breaker for *upstream* changed: follow it here."""
        if engine is not None:
            engine.breaker.apply_remote(state, remaining_s, time.monotonic())
            self.metrics.engine_health(engine)
