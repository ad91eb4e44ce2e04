"""What an engine tells about itself: its Prometheus series and its start-up log."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar


@dataclass(frozen=True)
class EngineMetricNames:
    """An engine's own Prometheus series for the signals kiban charts and alerts on.

    None where the engine exports nothing for the signal. kiban's recording
    rules (:mod:`kiban.observability.scrape`) map these onto one set of
    ``kiban:engine_*`` series, so dashboards and alerts work for every kind.
    """

    #: gauge, share of the KV cache in use, 0 to 1
    kv_cache_usage: str | None = None
    #: gauge, requests being processed (in the running batch)
    requests_running: str | None = None
    #: gauge, requests queued inside the engine
    requests_waiting: str | None = None
    #: counter, prompt (prefill) tokens processed
    prompt_tokens: str | None = None
    #: counter, generated tokens
    generation_tokens: str | None = None
    #: histogram (base name), time to first token in seconds
    ttft: str | None = None


@dataclass(frozen=True)
class EngineMetrics:
    """Where an engine serves its metrics, how to turn them on, and their names."""

    #: path of the Prometheus endpoint on the engine's API port; None: it has none
    path: str | None = "/metrics"
    #: launch flags that turn the endpoint on (added to every managed launch)
    launch_args: tuple[str, ...] = ()
    #: the engine's series for kiban's common signals
    names: EngineMetricNames = EngineMetricNames()


@dataclass(frozen=True)
class StartupReport:
    """What an engine's start-up log says about itself (None where it says nothing).

    ``device`` is where the engine put its model, as the engine reports it
    (``"cuda"``, ``"cpu"``); the GPU policy uses it where NVML cannot see
    processes (WSL2). ``errors`` are log lines that explain a failed start.
    """

    kv_cache_tokens: int | None = None
    kv_cache_bytes: int | None = None
    device: str | None = None
    errors: list[str] = field(default_factory=list)


class StartupLog:
    """Reads an engine's start-up log; engines that log nothing useful keep the default."""

    #: extra command-line arguments that make the engine log what `report` reads
    args: ClassVar[tuple[str, ...]] = ()

    def report(self, log_text: str) -> StartupReport:
        """Parse one start's log."""
        return StartupReport()
