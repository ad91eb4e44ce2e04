"""Active health checks: every engine's health endpoint, on an interval."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

import aiohttp

from kiban.gateway.metrics import Metrics
from kiban.gateway.upstreams import Upstream

log = logging.getLogger("kiban.health")


class HealthChecker:
    """Polls each upstream's health endpoint and records the result on it."""

    def __init__(
        self,
        upstreams: list[Upstream],
        session: aiohttp.ClientSession,
        metrics: Metrics,
        interval_s: float,
        timeout_s: float,
        on_checked: Callable[[], None] | None = None,
    ) -> None:
        self.upstreams = upstreams
        self.session = session
        self.metrics = metrics
        self.interval_s = interval_s
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)
        self.on_checked = on_checked
        self._task: asyncio.Task[None] | None = None

    async def check(self, upstream: Upstream) -> bool:
        url = upstream.config.url + upstream.kind.health_path
        headers = {}
        if upstream.config.api_key:
            headers["Authorization"] = f"Bearer {upstream.config.api_key}"
        try:
            async with self.session.get(url, timeout=self.timeout, headers=headers) as resp:
                await resp.read()
                ok, error = (
                    resp.status == 200,
                    None if resp.status == 200 else f"HTTP {resp.status}",
                )
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            ok, error = False, type(exc).__name__
        if ok != upstream.healthy:
            log.warning(
                "engine %s is %s%s",
                upstream.name,
                "healthy" if ok else "unhealthy",
                f" ({error})" if error else "",
            )
        upstream.on_health(ok, error)
        self.metrics.engine_health(upstream)
        return ok

    async def check_all(self) -> None:
        await asyncio.gather(*(self.check(u) for u in self.upstreams))
        if self.on_checked is not None:
            self.on_checked()

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            await self.check_all()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
