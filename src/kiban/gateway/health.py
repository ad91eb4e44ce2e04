"""Active health checks: every engine's health endpoint, on an interval."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from kiban.gateway.metrics import Metrics
from kiban.gateway.periodic import Periodic
from kiban.gateway.upstream_http import ConnectFailed, ConnectTimeout, UpstreamError
from kiban.gateway.upstreams import Upstream

log = logging.getLogger("kiban.health")


class HealthChecker:
    """Polls each upstream's health endpoint and records the result on it."""

    def __init__(
        self,
        upstreams: list[Upstream],
        metrics: Metrics,
        interval_s: float,
        timeout_s: float,
        failures: int = 1,
        on_checked: Callable[[], None] | None = None,
    ) -> None:
        self.upstreams = upstreams
        self.metrics = metrics
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.failures = failures
        self.on_checked = on_checked
        self._periodic = Periodic(interval_s, self.check_all)

    async def check(self, upstream: Upstream) -> bool:
        assert upstream.http is not None
        path = upstream.dialect.health_path.encode()
        deadline = asyncio.get_running_loop().time() + self.timeout_s
        try:
            resp = await upstream.http.request(
                b"GET",
                path,
                upstream.request_headers,
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
        except (UpstreamError, TimeoutError) as exc:
            ok, error = False, str(exc) or type(exc).__name__
            refused = isinstance(exc, ConnectFailed) and not isinstance(exc, ConnectTimeout)
        was_healthy = upstream.healthy
        upstream.on_health(ok, error, misses_allowed=self.failures - 1, refused=refused)
        if upstream.healthy != was_healthy:
            log.warning(
                "engine %s is %s%s",
                upstream.name,
                "healthy" if ok else "unhealthy",
                f" ({error})" if error else "",
            )
        elif not ok:
            log.info(
                "engine %s failed a health check (%d in a row; out after %d): %s",
                upstream.name,
                upstream.health_misses,
                self.failures,
                error,
            )
        self.metrics.engine_health(upstream)
        return ok

    async def check_all(self) -> None:
        await asyncio.gather(*(self.check(u) for u in self.upstreams))
        if self.on_checked is not None:
            self.on_checked()

    def start(self) -> None:
        self._periodic.start()

    async def stop(self) -> None:
        await self._periodic.stop()
