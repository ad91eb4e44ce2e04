"""SGLang's ``sglang.launch_server``."""

from __future__ import annotations

from typing import TYPE_CHECKING

from kiban.engines.base import EngineKind, LaunchTarget, LaunchUnsupported

if TYPE_CHECKING:
    from kiban.config import EngineConfig


class SGLang(EngineKind):
    """SGLang serves the OpenAI routes and GET /health."""

    name = "sglang"

    # -- launch --

    def environment(self, device: str) -> str:
        if device == "cpu":
            raise LaunchUnsupported("kiban runs SGLang on NVIDIA GPUs only; use launch.device: gpu")
        return "sglang"

    def launch_argv(self, engine: EngineConfig, target: LaunchTarget) -> list[str]:
        assert engine.launch is not None
        return [
            target.program("python"),
            "-m",
            "sglang.launch_server",
            "--model-path",
            engine.launch.model,
            "--served-model-name",
            engine.models[0],
            "--host",
            target.host,
            "--port",
            str(target.port),
        ]
