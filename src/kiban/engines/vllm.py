"""vLLM's OpenAI-compatible server (``vllm.entrypoints.openai.api_server``)."""

from kiban.engines.base import EngineKind, EngineMetricNames


class VLLM(EngineKind):
    """vLLM answers GET /health with 200 once the engine loop runs."""

    name = "vllm"

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
