"""lmdeploy's ``lmdeploy serve api_server``."""

from kiban.engines.base import EngineKind, EngineMetricNames


class LMDeploy(EngineKind):
    """lmdeploy errors come as ``{"object": "error", "message": ..., "code": ...}``;
    the base class maps that shape to the OpenAI one."""

    name = "lmdeploy"

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
