"""Prometheus scrape configuration and engine recording rules, generated from kiban.yaml.

Every engine target carries the same labels, whatever its kind:
``engine`` (its name in kiban.yaml), ``model`` (the names it serves),
``gpu`` (the GPU indices it was launched on, ``cpu``, or absent when kiban
does not manage it) and ``kind``. Engines label their own series too (vLLM
adds ``engine="0"``, its engine-core index); such a clash is kept as
``engine_index`` rather than Prometheus' ``exported_engine``.

The recording rules map each kind's own names (``EngineKind.metrics.names``)
onto one set of series, so dashboards, alerts and ``kiban report`` read the
same names for vLLM, llama.cpp, lmdeploy and SGLang:

========================================  =====================================
``kiban:engine_kv_cache_usage:ratio``     KV cache in use, 0 to 1 (max over engine cores)
``kiban:engine_requests_running``         requests in the running batch
``kiban:engine_requests_waiting``         requests queued in the engine
``kiban:engine_prompt_tokens:rate``       prompt tokens per second
``kiban:engine_generation_tokens:rate``   generated tokens per second
``kiban:engine_ttft_seconds:p95``         95th percentile time to first token
========================================  =====================================
"""

from __future__ import annotations

from typing import Any

from kiban.config import EngineConfig, KibanConfig
from kiban.engines import ENGINE_KINDS, EngineKind

GATEWAY_JOB = "kiban-gateway"
GPU_JOB = "kiban-gpu"
#: the gateway's private series (usage per key), read with an admin key
KEYS_JOB = "kiban-gateway-keys"
ENGINE_JOB_PREFIX = "kiban-engine-"
ENGINE_LABELS = ("engine", "model", "gpu", "kind")
ENGINE_RULES_GROUP = "kiban-engines"

# record name -> (EngineMetricNames field, aggregation, how the series is read)
_SIGNALS: dict[str, tuple[str, str, str]] = {
    "kiban:engine_kv_cache_usage:ratio": ("kv_cache_usage", "max", "gauge"),
    "kiban:engine_requests_running": ("requests_running", "sum", "gauge"),
    "kiban:engine_requests_waiting": ("requests_waiting", "sum", "gauge"),
    "kiban:engine_prompt_tokens:rate": ("prompt_tokens", "sum", "rate"),
    "kiban:engine_generation_tokens:rate": ("generation_tokens", "sum", "rate"),
    "kiban:engine_ttft_seconds:p95": ("ttft", "", "p95"),
}


def engine_labels(engine: EngineConfig) -> dict[str, str]:
    """The labels every series scraped from *engine* gets."""
    labels = {"engine": engine.name, "model": ",".join(engine.models), "kind": engine.kind}
    launch = engine.launch
    if launch is not None:
        labels["gpu"] = "cpu" if launch.device == "cpu" else ",".join(map(str, launch.gpus))
    return labels


def rate_window(scrape_interval_s: float) -> str:
    """A rate() window that holds at least four scrapes, and never less than a minute."""
    return f"{max(60, int(4 * scrape_interval_s + 0.999))}s"


def _target(url_or_host: str, port: int, target_host: str | None) -> str:
    host = target_host or url_or_host
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    return f"{host}:{port}"


def _engine_host(engine: EngineConfig) -> str:
    from urllib.parse import urlsplit

    return urlsplit(engine.url).hostname or "127.0.0.1"


def scrape_configs(
    cfg: KibanConfig,
    target_host: str | None = None,
    *,
    gateway_host: str | None = None,
    gpu_exporter_host: str | None = None,
) -> list[dict[str, Any]]:
    """One job for the gateway, one for a standalone GPU exporter, one per engine with metrics.

    With ``observability.metrics_key_file`` one more job reads the gateway's
    private per-key series from ``/admin/metrics`` with that admin key.

    *target_host* replaces every target's host (e.g. ``host.docker.internal``
    when Prometheus runs in a container); *gateway_host* and *gpu_exporter_host*
    name those two targets' hosts where each runs apart (a service name in a
    container network).
    """
    obs = cfg.observability
    gw = cfg.gateway
    jobs: list[dict[str, Any]] = [
        {
            "job_name": GATEWAY_JOB,
            "metrics_path": "/metrics",
            "static_configs": [
                {"targets": [_target(gateway_host or gw.host, gw.port, target_host)]}
            ],
        }
    ]
    if obs.metrics_key_file is not None:
        jobs.append(
            {
                "job_name": KEYS_JOB,
                "metrics_path": "/admin/metrics",
                "static_configs": jobs[0]["static_configs"],
                "authorization": {
                    "type": "Bearer",
                    "credentials_file": str(obs.metrics_key_file),
                },
            }
        )
    if obs.gpu_exporter == "standalone":
        jobs.append(
            {
                "job_name": GPU_JOB,
                "metrics_path": "/metrics",
                "static_configs": [
                    {
                        "targets": [
                            _target(
                                gpu_exporter_host or "127.0.0.1", obs.gpu_exporter_port, target_host
                            )
                        ]
                    }
                ],
            }
        )
    for engine in cfg.engines:
        kind: EngineKind = ENGINE_KINDS[engine.kind]
        if kind.metrics.path is None:
            continue
        jobs.append(
            {
                "job_name": ENGINE_JOB_PREFIX + engine.name,
                "metrics_path": kind.metrics.path,
                "scheme": engine.url.split("://", 1)[0],
                "static_configs": [
                    {
                        "targets": [_target(_engine_host(engine), engine.port, target_host)],
                        "labels": engine_labels(engine),
                    }
                ],
                "metric_relabel_configs": [
                    {"source_labels": ["exported_engine"], "target_label": "engine_index"},
                    {"action": "labeldrop", "regex": "exported_engine"},
                ],
                **_engine_auth(engine),
            }
        )
    return jobs


def _engine_auth(engine: EngineConfig) -> dict[str, Any]:
    if not engine.api_key:
        return {}
    return {"authorization": {"type": "Bearer", "credentials": engine.api_key}}


def prometheus_config(
    cfg: KibanConfig,
    rule_files: list[str],
    target_host: str | None = None,
    **hosts: str | None,
) -> dict[str, Any]:
    """The whole prometheus.yml as a mapping (*hosts*: see :func:`scrape_configs`)."""
    interval = f"{cfg.observability.scrape_interval_s:g}s"
    return {
        "global": {"scrape_interval": interval, "evaluation_interval": interval},
        "rule_files": rule_files,
        "scrape_configs": scrape_configs(cfg, target_host, **hosts),
    }


def _signal_expr(kind: EngineKind, field: str, how: str, aggregation: str, window: str) -> str:
    name = getattr(kind.metrics.names, field)
    by = ", ".join(ENGINE_LABELS)
    if how == "gauge":
        return f"{aggregation} by ({by}) ({name})"
    if how == "rate":
        return f"{aggregation} by ({by}) (rate({name}[{window}]))"
    return f"histogram_quantile(0.95, sum by ({by}, le) (rate({name}_bucket[{window}])))"


def engine_recording_rules(scrape_interval_s: float = 15.0) -> dict[str, Any]:
    """Recording rules from every engine kind's metric names to kiban's common series."""
    window = rate_window(scrape_interval_s)
    rules = []
    for record, (field, aggregation, how) in _SIGNALS.items():
        parts = [
            _signal_expr(kind, field, how, aggregation, window)
            for kind in ENGINE_KINDS.values()
            if kind.metrics.path is not None and getattr(kind.metrics.names, field)
        ]
        if parts:
            rules.append({"record": record, "expr": "\n  or\n".join(parts)})
    return {"groups": [{"name": ENGINE_RULES_GROUP, "rules": rules}]}
