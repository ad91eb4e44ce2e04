"""SGLang's ``sglang.launch_server``."""

from kiban.engines.base import EngineKind, EngineMetricNames


class SGLang(EngineKind):
    """SGLang serves the OpenAI routes and GET /health."""

    name = "sglang"

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
