"""Active health checks: every engine's health endpoint, on an interval."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from kiban.gateway.engine_client import ConnectFailed, ConnectTimeout, EngineError
from kiban.gateway.engines import Engine
from kiban.gateway.metrics import Metrics
from kiban.gateway.periodic import Periodic

log = logging.getLogger("kiban.health")


class HealthChecker:
    """Polls each engine's health endpoint and records the result on it."""

    def __init__(
        self,
        engines: list[Engine],
        metrics: Metrics,
        interval_s: float,
        timeout_s: float,
        failures: int = 1,
        on_checked: Callable[[], None] | None = None,
    ) -> None:
        self.engines = engines
        self.metrics = metrics
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.failures = failures
        self.on_checked = on_checked
        self._periodic = Periodic(interval_s, self.check_all)

    async def check(self, engine: Engine) -> bool:
        assert engine.http is not None
        path = engine.dialect.health_path.encode()
        deadline = asyncio.get_running_loop().time() + self.timeout_s
        try:
            resp = await engine.http.request(
                b"GET",
                path,
                engine.request_headers,
                b"",
                connect_timeout=self.timeout_s,
                total_at=deadline,
            )
            try:
                await resp.read()
            finally:
                resp.finish()
            ok, error = resp.status == 200, None if resp.status == 200 else f"HTTP {resp.status}"
            refused = False
        except (EngineError, TimeoutError) as exc:
            ok, error = False, str(exc) or type(exc).__name__
            refused = isinstance(exc, ConnectFailed) and not isinstance(exc, ConnectTimeout)
        was_healthy = engine.healthy
        engine.on_health(ok, error, misses_allowed=self.failures - 1, refused=refused)
        if engine.healthy != was_healthy:
            log.warning(
                "engine %s is %s%s",
                engine.name,
                "healthy" if ok else "unhealthy",
                f" ({error})" if error else "",
            )
        elif not ok:
            log.info(
                "engine %s failed a health check (%d in a row; out after %d): %s",
                engine.name,
                engine.health_misses,
                self.failures,
                error,
            )
        self.metrics.engine_health(engine)
        return ok

    async def check_all(self) -> None:
        await asyncio.gather(*(self.check(u) for u in self.engines))
        if self.on_checked is not None:
            self.on_checked()

    def start(self) -> None:
        self._periodic.start()

    async def stop(self) -> None:
        await self._periodic.stop()
