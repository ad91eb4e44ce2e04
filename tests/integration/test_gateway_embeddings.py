"""Embeddings through kiban from a REAL vLLM (CPU build) running the tiny model as a pooler."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from openai import OpenAI

from tests.support.engines import EngineProcess
from tests.support.gateway import gateway_process

pytestmark = pytest.mark.engine

KEY = "sk-kiban-embed-test-7c1d"


@pytest.fixture(scope="module")
def embedder(vllm_engine_factory, tiny_model_dir: Path) -> EngineProcess:
    return vllm_engine_factory(
        tiny_model_dir,
        "tiny-embed",
        max_model_len=512,
        extra_args=("--runner", "pooling", "--convert", "embed"),
    )


@pytest.fixture(scope="module")
def client(embedder: EngineProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[OpenAI]:
    config = {
        "gateway": {"api_keys": {"env": ["KIBAN_TEST_KEY"]}, "health_interval_s": 0.5},
        "engines": [
            {"name": "embedder", "kind": "vllm", "url": embedder.base_url, "models": ["tiny-embed"]}
        ],
        "routes": [{"model": "embed", "engines": ["embedder"]}],
    }
    work = tmp_path_factory.mktemp("gateway")
    gateway = gateway_process(config, work, env={"KIBAN_TEST_KEY": KEY}).start(timeout=60)
    try:
        yield OpenAI(base_url=f"{gateway.base_url}/v1", api_key=KEY, max_retries=0, timeout=60)
    finally:
        gateway.stop()


def test_embeddings(client: OpenAI, embedder: EngineProcess) -> None:
    resp = client.embeddings.create(model="embed", input=["hello world", "licence"])
    assert len(resp.data) == 2 and len(resp.data[0].embedding) == 256
    direct = OpenAI(base_url=f"{embedder.base_url}/v1", api_key="x", max_retries=0)
    straight = direct.embeddings.create(model="tiny-embed", input=["hello world", "licence"])
    assert resp.data[0].embedding == straight.data[0].embedding
