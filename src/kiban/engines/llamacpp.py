"""llama.cpp's native ``llama-server``."""

from kiban.engines.base import EngineKind, EngineMetricNames


class LlamaCpp(EngineKind):
    """llama-server answers /health with 503 while the model loads, 200 when ready."""

    name = "llamacpp"

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
