"""Any OpenAI-compatible server (a hosted API, Ollama's /v1, a custom server)."""

from kiban.engines.base import EngineKind


class OpenAICompatible(EngineKind):
    """Generic servers have no common health route; GET /v1/models is the one they share."""

    name = "openai"
    health_path = "/v1/models"

    # -- metrics --
    # A generic server has no known metrics endpoint; the gateway's own metrics cover it.
    metrics_path = None
