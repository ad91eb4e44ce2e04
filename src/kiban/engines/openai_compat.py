"""Any OpenAI-compatible server (a hosted API, Ollama's /v1, a custom server)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from kiban.engines.dialect import Dialect
from kiban.engines.kind import EngineKind
from kiban.engines.launch import Launcher, LaunchTarget
from kiban.engines.telemetry import EngineMetrics
from kiban.structured.capability import StructuredCapability

if TYPE_CHECKING:
    from kiban.config import EngineConfig


class OpenAIDialect(Dialect):
    """Generic servers have no common health route; GET /v1/models is the one they share."""

    health_path = "/v1/models"

    def refuses_context_length(self, status: int, error: dict[str, Any]) -> bool:
        """OpenAI's code, or a 400 whose message speaks of the context length or size (the
        wording of vLLM, SGLang, lmdeploy and llama.cpp behind a generic entry)."""
        if super().refuses_context_length(status, error):
            return True
        message = error.get("message")
        if status != 400 or not isinstance(message, str):
            return False
        lowered = message.lower()
        return "context length" in lowered or "context size" in lowered

    def structured_capability(self, config: EngineConfig) -> StructuredCapability:
        """``response_format`` can be sent, but nothing says the server enforces it
        (Ollama Cloud accepts a schema and ignores it): usable only on routes that
        validate and retry (``structured.unenforced: validate``)."""
        return StructuredCapability(
            expressible=frozenset({"json_schema", "json_object"}),
            describes=f"{config.name} (OpenAI-compatible, no enforcement assumed)",
        )


class CommandLauncher(Launcher):
    """Runs the user's ``launch.command`` from the system (no environment to build)."""

    takes_command = True

    def environment(self, device: str) -> str | None:
        return None

    def argv(self, engine: EngineConfig, target: LaunchTarget) -> list[str]:
        """``launch.command`` with ``{host}``, ``{port}``, ``{model}``, ``{name}`` filled in."""
        assert engine.launch is not None and engine.launch.command is not None
        values = {
            "host": target.host,
            "port": str(target.port),
            "model": engine.launch.model,
            "name": engine.models[0],
        }
        return [_fill(arg, values) for arg in engine.launch.command]


KIND = EngineKind(
    name="openai",
    dialect=OpenAIDialect(),
    launcher=CommandLauncher(),
    # a generic server has no known metrics endpoint; the gateway's own metrics cover it
    metrics=EngineMetrics(path=None),
)


def _fill(arg: str, values: dict[str, str]) -> str:
    for key, value in values.items():
        arg = arg.replace("{" + key + "}", value)
    return arg
