"""vLLM's OpenAI-compatible server (``vllm.entrypoints.openai.api_server``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from kiban.engines.base import EngineKind, EngineMetricNames, LaunchTarget

if TYPE_CHECKING:
    from kiban.config import EngineConfig


class VLLM(EngineKind):
    """vLLM answers GET /health with 200 once the engine loop runs."""

    name = "vllm"

    # -- launch --

    def environment(self, device: str) -> str:
        return "vllm-cpu" if device == "cpu" else "vllm-cuda"

    def launch_argv(self, engine: EngineConfig, target: LaunchTarget) -> list[str]:
        # `python -m` rather than the `vllm` console script: the CPU build's script
        # looks up a distribution named `vllm` and fails (shared/REAL-ENGINES-HERE.md).
        assert engine.launch is not None
        return [
            target.program("python"),
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            engine.launch.model,
            "--served-model-name",
            *engine.models,
            "--host",
            target.host,
            "--port",
            str(target.port),
        ]

    def launch_env(self, engine: EngineConfig) -> dict[str, str]:
        return {"VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}

    # -- metrics --
    # On by default (vLLM >= 0.6); names as vLLM 0.32 exports them (seen in a real run).
    metric_names = EngineMetricNames(
        kv_cache_usage="vllm:kv_cache_usage_perc",
        requests_running="vllm:num_requests_running",
        requests_waiting="vllm:num_requests_waiting",
        prompt_tokens="vllm:prompt_tokens_total",
        generation_tokens="vllm:generation_tokens_total",
        ttft="vllm:time_to_first_token_seconds",
    )
