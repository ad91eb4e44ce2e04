"""Any OpenAI-compatible server (a hosted API, Ollama's /v1, a custom server)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from kiban.engines.base import EngineKind
from kiban.structured.capability import StructuredCapability

if TYPE_CHECKING:
    from kiban.config import EngineConfig


class OpenAICompatible(EngineKind):
    """Generic servers have no common health route; GET /v1/models is the one they share."""

    name = "openai"
    health_path = "/v1/models"

    # -- structured output --

    def structured_capability(self, config: EngineConfig) -> StructuredCapability:
        """``response_format`` can be sent, but nothing says the server enforces it
        (Ollama Cloud accepts a schema and ignores it): usable only on routes that
        validate and retry (``structured.unenforced: validate``)."""
        return StructuredCapability(
            expressible=frozenset({"json_schema", "json_object"}),
            describes=f"{config.name} (OpenAI-compatible, no enforcement assumed)",
        )
