"""SGLang's ``sglang.launch_server``."""

from __future__ import annotations

from typing import TYPE_CHECKING

from kiban.engines.base import EngineKind, EngineMetricNames, LaunchTarget, LaunchUnsupported

if TYPE_CHECKING:
    from kiban.config import EngineConfig


class SGLang(EngineKind):
    """SGLang serves the OpenAI routes and GET /health."""

    name = "sglang"

    # -- launch --

    def environment(self, device: str) -> str:
        if device == "cpu":
            raise LaunchUnsupported("kiban runs SGLang on NVIDIA GPUs only; use launch.device: gpu")
        return "sglang"

    def launch_argv(self, engine: EngineConfig, target: LaunchTarget) -> list[str]:
        assert engine.launch is not None
        return [
            target.program("python"),
            "-m",
            "sglang.launch_server",
            "--model-path",
            engine.launch.model,
            "--served-model-name",
            engine.models[0],
            "--host",
            target.host,
            "--port",
            str(target.port),
        ]

    # -- metrics --
    # ``--enable-metrics`` serves /metrics on the API port; token_usage is the KV pool in use.
    metrics_launch_args = ("--enable-metrics",)
    metric_names = EngineMetricNames(
        kv_cache_usage="sglang:token_usage",
        requests_running="sglang:num_running_reqs",
        requests_waiting="sglang:num_queue_reqs",
        prompt_tokens="sglang:prompt_tokens_total",
        generation_tokens="sglang:generation_tokens_total",
        ttft="sglang:time_to_first_token_seconds",
    )
