"""Live figures straight from the /metrics endpoints, for `kiban status` without Prometheus.

Two scrapes a short interval apart give rates (generated tokens/s); gauges
come from the second scrape. The series are the engines' own (named by each
engine module's ``metrics.names``) and the gateway's ``kiban_*`` ones, the same
that Prometheus, the dashboards and ``kiban report`` use.
"""

from __future__ import annotations

import time
import urllib.request
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

Samples = dict[str, list[tuple[dict[str, str], float]]]


def scrape(url: str, timeout: float = 2.0) -> Samples | None:
    """Every sample of one /metrics page by sample name; None when it cannot be read."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            text = resp.read().decode("utf-8", "replace")
        samples: Samples = defaultdict(list)
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                samples[sample.name].append((sample.labels, float(sample.value)))
        return samples
    except (OSError, ValueError):
        return None


def total(samples: Samples, name: str | None) -> float | None:
    """Sum of a series over its labels (counters also under ``<name>_total``)."""
    if name is None:
        return None
    values = samples.get(name) or samples.get(f"{name}_total")
    if not values:
        return None
    return sum(v for _, v in values)


@dataclass
class EngineLive:
    tokens_per_s: float | None = None
    running: float | None = None
    waiting: float | None = None
    kv_cache_usage: float | None = None


@dataclass
class LiveSnapshot:
    engines: dict[str, EngineLive] = field(default_factory=dict)
    in_flight: float | None = None
    gpu_memory: dict[str, tuple[float, float]] = field(default_factory=dict)  # used, total


@dataclass(frozen=True)
class EngineTarget:
    """Where one engine's metrics are, and which of its series mean what."""

    name: str
    metrics_url: str
    running: str | None
    waiting: str | None
    kv_cache_usage: str | None
    generation_tokens: str | None


def snapshot(
    engines: list[EngineTarget], gateway_metrics_url: str | None, interval_s: float = 1.0
) -> LiveSnapshot:
    """Scrape everything twice, *interval_s* apart, in parallel."""
    urls = [e.metrics_url for e in engines] + ([gateway_metrics_url] if gateway_metrics_url else [])
    with ThreadPoolExecutor(max_workers=max(1, len(urls))) as pool:
        first = list(pool.map(scrape, urls))
        started = time.monotonic()
        time.sleep(interval_s)
        second = list(pool.map(scrape, urls))
        elapsed = time.monotonic() - started
    live = LiveSnapshot()
    for engine, before, after in zip(engines, first, second, strict=False):
        if after is None:
            continue
        figures = EngineLive(
            running=total(after, engine.running),
            waiting=total(after, engine.waiting),
            kv_cache_usage=total(after, engine.kv_cache_usage),
        )
        if before is not None:
            t0, t1 = total(before, engine.generation_tokens), total(after, engine.generation_tokens)
            if t0 is not None and t1 is not None:
                figures.tokens_per_s = max(0.0, t1 - t0) / elapsed
        live.engines[engine.name] = figures
    gateway = second[-1] if gateway_metrics_url else None
    if gateway is not None:
        live.in_flight = total(gateway, "kiban_in_flight_requests")
        used = {lbl.get("gpu", ""): v for lbl, v in gateway.get("kiban_gpu_memory_used_bytes", [])}
        size = {lbl.get("gpu", ""): v for lbl, v in gateway.get("kiban_gpu_memory_total_bytes", [])}
        live.gpu_memory = {gpu: (used[gpu], size[gpu]) for gpu in used if gpu in size}
    return live
