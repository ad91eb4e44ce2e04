"""Any OpenAI-compatible server (a hosted API, Ollama's /v1, a custom server)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from kiban.engines.base import EngineKind, LaunchTarget

if TYPE_CHECKING:
    from kiban.config import EngineConfig


class OpenAICompatible(EngineKind):
    """Generic servers have no common health route; GET /v1/models is the one they share."""

    name = "openai"
    health_path = "/v1/models"
    takes_launch_command = True

    # -- metrics --
    # A generic server has no known metrics endpoint; the gateway's own metrics cover it.
    metrics_path = None

    # -- launch --

    def environment(self, device: str) -> str | None:
        return None

    def launch_argv(self, engine: EngineConfig, target: LaunchTarget) -> list[str]:
        """``launch.command`` with ``{host}``, ``{port}``, ``{model}``, ``{name}`` filled in."""
        assert engine.launch is not None and engine.launch.command is not None
        values = {
            "host": target.host,
            "port": str(target.port),
            "model": engine.launch.model,
            "name": engine.models[0],
        }
        return [_fill(arg, values) for arg in engine.launch.command]


def _fill(arg: str, values: dict[str, str]) -> str:
    for key, value in values.items():
        arg = arg.replace("{" + key + "}", value)
    return arg
