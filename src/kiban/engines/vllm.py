"""vLLM's OpenAI-compatible server (``vllm.entrypoints.openai.api_server``)."""

from kiban.engines.base import EngineKind


class VLLM(EngineKind):
    """vLLM answers GET /health with 200 once the engine loop runs."""

    name = "vllm"
