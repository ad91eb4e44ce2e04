"""From an engine's `launch` section to the exact command, environment and URLs it runs with.

The command line is the engine kind's own server command, the flags kiban
relies on (start-up report lines, metrics endpoint), then the planner's flags,
then ``launch.args`` verbatim. The environment selects the device:
the engine's GPUs by UUID for ``device: gpu``, no GPU at all for ``device: cpu``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from kiban import gpus
from kiban.config import EngineConfig
from kiban.deploy.envs import ensure_engine_env
from kiban.engines import ENGINE_KINDS
from kiban.engines.launch import LaunchTarget


@dataclass(frozen=True)
class EngineCommand:
    """Everything needed to start (and restart) one managed engine."""

    name: str
    argv: list[str]
    env: dict[str, str]
    url: str
    health_url: str


def listen_address(engine: EngineConfig) -> tuple[str, int]:
    """Host and port the engine listens on, taken from its URL."""
    parts = urlsplit(engine.url)
    return parts.hostname or "127.0.0.1", engine.port


def device_env(engine: EngineConfig) -> dict[str, str]:
    """Which GPUs the engine may see: its own, or none at all on ``device: cpu``."""
    assert engine.launch is not None
    if engine.launch.device == "cpu":
        return {"CUDA_VISIBLE_DEVICES": ""}
    return gpus.visible_devices_env(engine.launch.gpus)


def engine_argv(
    engine: EngineConfig, target: LaunchTarget, plan_flags: list[str] | None = None
) -> list[str]:
    """The engine's server command, kiban's own flags, the plan's flags, then launch.args.

    The one ordering every way of running an engine uses (processes, containers).
    """
    assert engine.launch is not None
    kind = ENGINE_KINDS[engine.kind]
    argv = kind.launch().argv(engine, target)
    # what kiban itself relies on: the start-up report's lines, the metrics endpoint, and
    # the structured-output backend with bounded whitespace
    argv += [*kind.startup_log.args, *kind.metrics.launch_args]
    argv += kind.launch().structured_args(engine)
    return [*argv, *(plan_flags or []), *engine.launch.args]


def engine_extra_env(
    engine: EngineConfig, plan_env: dict[str, str] | None, device: dict[str, str]
) -> dict[str, str]:
    """What kiban adds to the engine's environment: the kind's, the plan's, *device*'s,
    then launch.env (which wins)."""
    assert engine.launch is not None
    kind = ENGINE_KINDS[engine.kind]
    return {**kind.launch().env(engine), **(plan_env or {}), **device, **engine.launch.env}


def engine_command(
    engine: EngineConfig,
    env_root: Path | None,
    plan_flags: list[str] | None = None,
    plan_env: dict[str, str] | None = None,
) -> EngineCommand:
    """The command for a managed engine whose environment lives at *env_root*."""
    assert engine.launch is not None
    kind = ENGINE_KINDS[engine.kind]
    host, port = listen_address(engine)
    argv = engine_argv(engine, LaunchTarget(env_root=env_root, host=host, port=port), plan_flags)
    extra = engine_extra_env(engine, plan_env, device_env(engine))
    return EngineCommand(
        name=engine.name,
        argv=argv,
        env=os.environ | extra,
        url=engine.url,
        health_url=engine.url + kind.dialect.health_path,
    )


def engine_env_root(
    engine: EngineConfig, progress: Callable[[str], None] | None = None
) -> Path | None:
    """Build or reuse the isolated environment this engine runs from; its root folder.

    None for engines whose command runs from the system (no environment of kiban's).
    """
    assert engine.launch is not None
    name = ENGINE_KINDS[engine.kind].launch().environment(engine.launch.device)
    return None if name is None else ensure_engine_env(name, progress=progress).root
