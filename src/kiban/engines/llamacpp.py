"""llama.cpp's native ``llama-server``."""

from __future__ import annotations

from typing import TYPE_CHECKING

from kiban.engines.base import EngineKind, EngineMetricNames, LaunchTarget

if TYPE_CHECKING:
    from kiban.config import EngineConfig


class LlamaCpp(EngineKind):
    """llama-server answers /health with 503 while the model loads, 200 when ready."""

    name = "llamacpp"

    # -- launch --

    def environment(self, device: str) -> str:
        return "llamacpp-cpu" if device == "cpu" else "llamacpp-cuda"

    def launch_argv(self, engine: EngineConfig, target: LaunchTarget) -> list[str]:
        assert engine.launch is not None
        return [
            target.program("llama-server"),
            "--model",
            engine.launch.model,
            "--host",
            target.host,
            "--port",
            str(target.port),
            "--alias",
            engine.models[0],
        ]

    # -- metrics --
    # /metrics answers only with --metrics. Current llama-server exports no KV-cache
    # usage gauge (older builds had llamacpp:kv_cache_usage_ratio) and no TTFT histogram.
    metrics_launch_args = ("--metrics",)
    metric_names = EngineMetricNames(
        requests_running="llamacpp:requests_processing",
        requests_waiting="llamacpp:requests_deferred",
        prompt_tokens="llamacpp:prompt_tokens_total",
        generation_tokens="llamacpp:tokens_predicted_total",
    )
