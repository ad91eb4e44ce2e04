"""What the console shows, as one JSON document built from kiban's own state and metrics.

Sources, nothing else: the gateway's live objects (routes, engines, health,
circuits), its metrics exposition (all workers' series, the NVML GPU
series), the engines' own /metrics, the supervisor's ``state.json``, the
keys and their usage (:mod:`kiban.gateway.usage`), and the plan of
``kiban plan``. The chart series are sampled when the document is asked for
(at most once a second) from the gateway's counters and TTFT histogram, and
kept for the last :data:`SERIES_POINTS` samples.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import os
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client.parser import text_string_to_metric_families

from kiban.gateway.usage_store import hour_of, totals
from kiban.observability.snapshot import Samples, scrape, total
from kiban.run_state import RUN_STATE_ENV

if TYPE_CHECKING:
    from kiban.gateway.app import Gateway
    from kiban.gateway.proxy import Exchange

SERIES_POINTS = 600
ERRORS_KEPT = 50
_MIN_SAMPLE_S = 1.0
_SCRAPE_TIMEOUT_S = 1.5


@dataclass(frozen=True, slots=True)
class _Sample:
    at: float
    requests: float
    completion_tokens: float
    ttft_buckets: tuple[tuple[float, float], ...]  # (upper bound, cumulative count)


class RecentErrors:
    """The last failed requests of this worker: id, route, engine, status, code."""

    def __init__(self, kept: int = ERRORS_KEPT) -> None:
        self.items: deque[dict[str, Any]] = deque(maxlen=kept)

    def observe(self, ex: Exchange, route: str) -> None:
        if ex.status >= 400 or ex.error is not None:
            self.items.append(
                {
                    "at": time.time(),
                    "request_id": ex.request_id,
                    "route": route,
                    "engine": ex.engine,
                    "status": ex.status,
                    "code": ex.error,
                }
            )


def parse(text: str) -> Samples:
    """Every sample of an exposition by sample name."""
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((sample.labels, float(sample.value)))
    return samples


def by_label(samples: Samples, name: str, label: str) -> dict[str, float]:
    """A series summed per value of one label."""
    found: dict[str, float] = {}
    for labels, value in samples.get(name, []):
        key = labels.get(label, "")
        found[key] = found.get(key, 0.0) + value
    return found


def quantile(q: float, buckets: Iterable[tuple[float, float]]) -> float | None:
    """Prometheus' histogram_quantile over cumulative (upper bound, count) pairs."""
    ordered = sorted(buckets)
    if not ordered or ordered[-1][1] <= 0:
        return None
    rank = q * ordered[-1][1]
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in ordered:
        if count >= rank:
            if math.isinf(bound):
                return lower_bound
            if count == lower_count:
                return bound
            share = (rank - lower_count) / (count - lower_count)
            return lower_bound + (bound - lower_bound) * share
        lower_bound, lower_count = bound, count
    return None


class ConsoleState:
    """Builds the console's document for one gateway."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.errors = RecentErrors()
        self.samples: deque[_Sample] = deque(maxlen=SERIES_POINTS + 1)
        self._engine_tokens: dict[str, tuple[float, float]] = {}  # engine: (at, tokens)
        self._plan: tuple[int, dict[str, Any]] | None = None  # (generation, plan)

    async def document(self) -> dict[str, Any]:
        gw = self.gateway
        text = (await asyncio.to_thread(gw.metrics.render, "all")).decode()
        samples = parse(text)
        now = time.time()
        self._sample(samples, now)
        engines, plan, usage_day = await asyncio.gather(
            self._engines(samples, now), self._plan_of(), gw.usage.rows(now - 86400)
        )
        return {
            "at": now,
            "worker": gw.worker_pid,
            "generation": gw.live.generation,
            "engines": engines,
            "gpus": _gpus(samples, plan),
            "routes": self._routes(samples),
            "keys": self._keys(samples, usage_day, now),
            "errors": list(reversed(self.errors.items)),
            "plan": plan,
            "series": self._series(),
        }

    # -- charts ------------------------------------------------------------------------------

    def _sample(self, samples: Samples, now: float) -> None:
        if self.samples and now - self.samples[-1].at < _MIN_SAMPLE_S:
            return
        buckets: dict[float, float] = {}
        for labels, value in samples.get("kiban_time_to_first_token_seconds_bucket", []):
            bound = float(labels["le"])
            buckets[bound] = buckets.get(bound, 0.0) + value
        completion = by_label(samples, "kiban_tokens_total", "type").get("completion", 0.0)
        requests = total(samples, "kiban_requests") or 0.0
        self.samples.append(_Sample(now, requests, completion, tuple(sorted(buckets.items()))))

    def _series(self) -> dict[str, list[float | None]]:
        t: list[float | None] = []
        rps: list[float | None] = []
        requests: list[float | None] = []
        tps: list[float | None] = []
        p50: list[float | None] = []
        p95: list[float | None] = []
        for before, after in itertools.pairwise(self.samples):
            dt = after.at - before.at
            t.append(after.at)
            count = max(0.0, after.requests - before.requests)
            requests.append(count)
            rps.append(count / dt)
            tps.append(max(0.0, after.completion_tokens - before.completion_tokens) / dt)
            previous = dict(before.ttft_buckets)
            delta = [(b, c - previous.get(b, 0.0)) for b, c in after.ttft_buckets]
            p50.append(quantile(0.5, delta))
            p95.append(quantile(0.95, delta))
        return {
            "t": t,
            "requests_per_s": rps,
            "requests": requests,
            "ttft_p50_s": p50,
            "ttft_p95_s": p95,
            "tokens_per_s": tps,
        }

    # -- tables ------------------------------------------------------------------------------

    async def _engines(self, samples: Samples, now: float) -> list[dict[str, Any]]:
        gw = self.gateway
        records = _run_state()
        engines = list(gw.router.engines.values())
        urls = [
            u.config.url.rstrip("/") + u.metrics.path if u.metrics.path else None for u in engines
        ]
        scraped = await asyncio.gather(
            *(asyncio.to_thread(scrape, url, _SCRAPE_TIMEOUT_S) for url in urls if url)
        )
        by_url = dict(zip([url for url in urls if url], scraped, strict=True))
        failures = by_label(samples, "kiban_upstream_failures_total", "engine")
        rows = []
        for engine, url in zip(engines, urls, strict=True):
            name, names = engine.name, engine.metrics.names
            engine_samples = by_url.get(url) if url else None
            record = records.get(name, {})
            started = record.get("started_at")
            row: dict[str, Any] = {
                "name": name,
                "kind": engine.config.kind,
                "url": engine.config.url,
                "healthy": engine.healthy,
                "health_error": engine.last_health_error,
                "circuit": engine.breaker.state.name.lower(),
                "in_flight": engine.outstanding,
                "max_concurrency": engine.config.max_concurrency,
                "failures": failures.get(name, 0.0),
                "state": record.get("state"),
                "gpus": record.get("gpus"),
                "gpu_verified": record.get("gpu_verified"),
                "restarts": record.get("restarts"),
                "uptime_s": now - started if started and record.get("state") == "running" else None,
                "metrics": engine_samples is not None,
                "running": None,
                "waiting": None,
                "kv_cache_usage": None,
                "tokens_per_s": None,
            }
            if engine_samples is not None:
                row["running"] = total(engine_samples, names.requests_running)
                row["waiting"] = total(engine_samples, names.requests_waiting)
                row["kv_cache_usage"] = total(engine_samples, names.kv_cache_usage)
                row["tokens_per_s"] = self._rate(
                    name, total(engine_samples, names.generation_tokens), now
                )
            rows.append(row)
        return rows

    def _rate(self, engine: str, tokens: float | None, now: float) -> float | None:
        if tokens is None:
            return None
        before = self._engine_tokens.get(engine)
        self._engine_tokens[engine] = (now, tokens)
        if before is None or now <= before[0]:
            return None
        return max(0.0, tokens - before[1]) / (now - before[0])

    def _routes(self, samples: Samples) -> list[dict[str, Any]]:
        failovers = by_label(samples, "kiban_failovers_total", "route")
        requests = by_label(samples, "kiban_requests_total", "route")
        now = time.monotonic()
        return [
            {
                "name": route.name,
                "strategy": route.config.strategy,
                "engines": [t.engine.name for t in route.targets],
                "healthy": [
                    t.engine.name
                    for t in route.targets
                    if t.engine.healthy and t.engine.breaker.allows(now)
                ],
                "requests": requests.get(route.name, 0.0),
                "failovers": failovers.get(route.name, 0.0),
            }
            for route in self.gateway.router.routes
        ]

    def _keys(self, samples: Samples, day_rows: list[Any], now: float) -> list[dict[str, Any]]:
        keys = self.gateway.live.keys
        day = totals(day_rows)
        hour = totals(r for r in day_rows if r.hour == hour_of(now))
        rejections = by_label(samples, "kiban_key_rate_limit_rejections_total", "key")
        rows = []
        for entry in keys.keys:
            limits = entry.limits
            rows.append(
                {
                    "name": entry.name,
                    "admin": entry.admin,
                    "models": list(entry.models) if entry.models is not None else None,
                    "requests_per_minute": limits.requests_per_minute if limits else None,
                    "tokens_per_minute": limits.tokens_per_minute if limits else None,
                    "this_hour": _usage(hour.get(entry.name)),
                    "last_24h": _usage(day.get(entry.name)),
                    "rate_limit_rejections": rejections.get(entry.name, 0.0),
                }
            )
        return rows

    async def _plan_of(self) -> dict[str, Any]:
        generation = self.gateway.live.generation
        if self._plan is None or self._plan[0] != generation:
            self._plan = (
                generation,
                await asyncio.to_thread(_plan, self.gateway.plan_view, self.gateway.config),
            )
        return self._plan[1]


def _usage(counts: list[int] | None) -> dict[str, int]:
    requests, prompt, completion = counts or (0, 0, 0)
    return {"requests": requests, "prompt_tokens": prompt, "completion_tokens": completion}


def _run_state() -> dict[str, dict[str, Any]]:
    """The supervisor's records of the engines (empty when kiban up does not run them)."""
    path = os.environ.get(RUN_STATE_ENV)
    if not path:
        return {}
    try:
        engines = json.loads(Path(path).read_text()).get("engines", {})
    except (OSError, ValueError):
        return {}
    return engines if isinstance(engines, dict) else {}


def _plan(view: Callable[[Any], dict[str, Any]] | None, config: Any) -> dict[str, Any]:
    """``kiban plan --json`` of the running configuration, or why there is none."""
    if view is None:
        return {"engines": [], "devices": [], "note": "this gateway process has no planner"}
    return view(config)


def _gpus(samples: Samples, plan: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per GPU the NVML exporter reads, with the plan's shares of its device."""
    info = samples.get("kiban_gpu_info", [])
    names = {labels.get("gpu", ""): labels.get("name") for labels, _ in info}
    series = {
        "memory_used_bytes": "kiban_gpu_memory_used_bytes",
        "memory_total_bytes": "kiban_gpu_memory_total_bytes",
        "utilization": "kiban_gpu_utilization_ratio",
        "temperature_c": "kiban_gpu_temperature_celsius",
        "power_w": "kiban_gpu_power_watts",
    }
    values = {field: by_label(samples, name, "gpu") for field, name in series.items()}
    planned = {d["key"]: d.get("shares", {}) for d in plan.get("devices", [])}
    rows = []
    for gpu in sorted(set(names) | set(values["memory_total_bytes"])):
        row: dict[str, Any] = {"gpu": gpu, "name": names.get(gpu)}
        row |= {field: found.get(gpu) for field, found in values.items()}
        row["planned"] = planned.get(f"gpu{gpu}", {})
        rows.append(row)
    return rows
