"""The engines' own load as a routing input: their queue and KV-cache use, scraped.

With ``gateway.engine_load_interval_s`` set, the gateway reads each engine's
/metrics at that interval and keeps a penalty on the engine that
``least_outstanding`` and ``cache_aware`` add to its requests in flight: one
per request waiting in the engine's own queue (vLLM ``num_requests_waiting``,
llama.cpp ``requests_deferred``, SGLang ``num_queue_reqs``, lmdeploy
``num_requests_waiting``), and :data:`KV_AVOID` once its KV cache is at least
``gateway.kv_avoid_ratio`` full, so that an engine close to KV exhaustion is
passed over before it starts queueing. An engine whose metrics cannot be read
gets no penalty (its health check decides about it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from dataclasses import dataclass
from functools import cache

from kiban.engines.telemetry import EngineMetricNames
from kiban.gateway.engine_client import EngineError
from kiban.gateway.engines import Engine
from kiban.gateway.periodic import Periodic

log = logging.getLogger("kiban.engine_load")

#: added to an engine's load while its KV cache is nearly full: it sorts after every other
KV_AVOID = 1 << 20


@dataclass(frozen=True, slots=True)
class EngineLoad:
    """One reading: requests queued in the engine (summed), KV cache in use 0-1 (max)."""

    waiting: float | None
    kv_usage: float | None

    def penalty(self, kv_avoid_ratio: float) -> int:
        penalty = int(self.waiting or 0)
        if self.kv_usage is not None and self.kv_usage >= kv_avoid_ratio:
            penalty += KV_AVOID
        return penalty


@cache
def _sample_pattern(name: str) -> re.Pattern[bytes]:
    """Lines of series *name* (any labels) in the Prometheus text format; group 1 the value."""
    return re.compile(rb"^" + re.escape(name.encode()) + rb"(?:\{[^}\n]*\})?[ \t]+(\S+)", re.M)


def _values(text: bytes, name: str | None) -> list[float]:
    if name is None:
        return []
    out = []
    for raw in _sample_pattern(name).findall(text):
        with contextlib.suppress(ValueError):
            out.append(float(raw))
    return out


def read_load(text: bytes, names: EngineMetricNames) -> EngineLoad:
    """The engine's queue and KV use from its /metrics text (None where it exports neither)."""
    waiting = _values(text, names.requests_waiting)
    kv = _values(text, names.kv_cache_usage)
    return EngineLoad(sum(waiting) if waiting else None, max(kv) if kv else None)


class LoadScraper:
    """Reads every engine's /metrics on an interval and sets ``Engine.load_penalty``."""

    def __init__(
        self, engines: list[Engine], interval_s: float, timeout_s: float, kv_avoid: float
    ) -> None:
        self.engines = engines
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.kv_avoid = kv_avoid
        self._periodic = Periodic(interval_s, self.scrape_all)

    async def scrape(self, engine: Engine) -> EngineLoad | None:
        path = engine.metrics.path
        names = engine.metrics.names
        if path is None or engine.http is None:
            return None
        if names.requests_waiting is None and names.kv_cache_usage is None:
            return None
        deadline = asyncio.get_running_loop().time() + self.timeout_s
        try:
            resp = await engine.http.request(
                b"GET",
                path.encode(),
                engine.request_headers,
                b"",
                connect_timeout=self.timeout_s,
                total_at=deadline,
            )
            try:
                body = await resp.read()
            finally:
                resp.finish()
        except (EngineError, TimeoutError) as exc:
            log.debug("engine %s: metrics not read (%s)", engine.name, exc)
            engine.load_penalty = 0
            return None
        if resp.status != 200:
            engine.load_penalty = 0
            return None
        load = read_load(body, names)
        engine.load_penalty = load.penalty(self.kv_avoid)
        return load

    async def scrape_all(self) -> None:
        await asyncio.gather(*(self.scrape(u) for u in self.engines))

    def start(self) -> None:
        self._periodic.start()

    async def stop(self) -> None:
        await self._periodic.stop()
