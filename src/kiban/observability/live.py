"""Live figures for ``kiban status``: the last values of the same series the dashboards show."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from kiban.observability.report import Prometheus

_ENGINE = {
    "tokens_per_s": "sum by (engine) (kiban:engine_generation_tokens:rate)",
    "requests_running": "sum by (engine) (kiban:engine_requests_running)",
    "requests_waiting": "sum by (engine) (kiban:engine_requests_waiting)",
    "kv_cache_usage": "max by (engine) (kiban:engine_kv_cache_usage:ratio)",
    "up": "min by (engine) (kiban_engine_up)",
    "gpu_verified": "min by (engine) (kiban_engine_gpu_verified)",
}
_GPU = {
    "memory_used_bytes": "max by (gpu) (kiban_gpu_memory_used_bytes)",
    "memory_total_bytes": "max by (gpu) (kiban_gpu_memory_total_bytes)",
    "utilization": "max by (gpu) (kiban_gpu_utilization_ratio)",
    "temperature_celsius": "max by (gpu) (kiban_gpu_temperature_celsius)",
}
_ROUTE = {"in_flight": "sum by (route) (kiban_in_flight_requests)"}


@dataclass
class LiveFigures:
    """Latest value per engine, GPU and route; a figure Prometheus has no series for is absent."""

    engines: dict[str, dict[str, float]] = field(default_factory=dict)
    gpus: dict[str, dict[str, float]] = field(default_factory=dict)
    routes: dict[str, dict[str, float]] = field(default_factory=dict)


def live_figures(prom: Prometheus, at: float | None = None) -> LiveFigures:
    """One instant query per figure; raises ReportError when Prometheus cannot be read."""
    at = time.time() if at is None else at
    figures = LiveFigures()
    for queries, label, target in (
        (_ENGINE, "engine", figures.engines),
        (_GPU, "gpu", figures.gpus),
        (_ROUTE, "route", figures.routes),
    ):
        for name, promql in queries.items():
            for item in prom.query(promql, at):
                value = float(item["value"][1])
                if value == value:  # not NaN
                    target.setdefault(item["metric"].get(label, ""), {})[name] = value
    return figures
