"""lmdeploy's ``lmdeploy serve api_server``."""

from __future__ import annotations

from typing import TYPE_CHECKING

from kiban.engines.base import EngineKind, EngineMetricNames, LaunchTarget, LaunchUnsupported

if TYPE_CHECKING:
    from kiban.config import EngineConfig


class LMDeploy(EngineKind):
    """lmdeploy errors come as ``{"object": "error", "message": ..., "code": ...}``;
    the base class maps that shape to the OpenAI one."""

    name = "lmdeploy"

    # -- launch --

    def environment(self, device: str) -> str:
        if device == "cpu":
            raise LaunchUnsupported("lmdeploy has no CPU backend; use launch.device: gpu")
        return "lmdeploy"

    def launch_argv(self, engine: EngineConfig, target: LaunchTarget) -> list[str]:
        # lmdeploy/cli/serve.py (v0.16.0): `serve api_server MODEL --server-name --server-port
        # --model-name`; one served name per server.
        assert engine.launch is not None
        return [
            target.program("lmdeploy"),
            "serve",
            "api_server",
            engine.launch.model,
            "--server-name",
            target.host,
            "--server-port",
            str(target.port),
            "--model-name",
            engine.models[0],
        ]

    # -- metrics --
    # ``lmdeploy serve api_server --enable-metrics`` serves /metrics on the API port.
    metrics_launch_args = ("--enable-metrics",)
    metric_names = EngineMetricNames(
        kv_cache_usage="lmdeploy:gpu_cache_usage_perc",
        requests_running="lmdeploy:num_requests_running",
        requests_waiting="lmdeploy:num_requests_waiting",
        prompt_tokens="lmdeploy:prompt_tokens_total",
        generation_tokens="lmdeploy:generation_tokens_total",
        ttft="lmdeploy:time_to_first_token_seconds",
    )
