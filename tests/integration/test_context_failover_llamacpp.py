"""Context-length failover between two real llama.cpp engines with different context sizes.

The route's first engine holds 256 tokens, the second 2048 (the same tiny model).
A prompt of several hundred tokens is refused by the first with llama.cpp's own
``exceed_context_size_error``, which kiban recognises and passes on to the larger
engine; a short prompt stays on the first.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from tests.support.engines import EngineProcess
from tests.support.gateway import gateway_process

pytestmark = pytest.mark.engine
SMALL_CTX, LARGE_CTX = 256, 2048
LONG = [{"role": "user", "content": " ".join(str(i) for i in range(300))}]
SHORT = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def engines(llamacpp_engine_factory, tiny_gguf: Path) -> dict[str, EngineProcess]:
    return {
        name: llamacpp_engine_factory(
            tiny_gguf, "tiny", ctx=ctx, parallel=1, extra_args=("-t", "1")
        )
        for name, ctx in (("small", SMALL_CTX), ("large", LARGE_CTX))
    }


@pytest.fixture(scope="module")
def gateway(engines, tmp_path_factory: pytest.TempPathFactory):
    config = {
        "gateway": {"health_interval_s": 5},
        "engines": [
            {"name": name, "kind": "llamacpp", "url": e.base_url, "models": ["tiny"],
             "context": ctx}
            for (name, e), ctx in zip(engines.items(), (SMALL_CTX, LARGE_CTX), strict=True)
        ],
        "routes": [{"model": "tiny", "engines": ["small", "large"]}],
    }  # fmt: skip
    gw = gateway_process(config, tmp_path_factory.mktemp("ctx")).start(timeout=60)
    yield gw
    gw.stop()


def _post(url: str, messages: list[dict], stream: bool = False) -> httpx.Response:
    body = {"model": "tiny", "messages": messages, "max_tokens": 8, "stream": stream}
    return httpx.post(url + "/v1/chat/completions", json=body, timeout=120)


def test_the_small_engine_refuses_in_its_own_words(engines) -> None:
    resp = _post(engines["small"].base_url, LONG)
    assert resp.status_code == 400
    assert resp.json()["error"]["type"] == "exceed_context_size_error"


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_a_long_prompt_moves_to_the_larger_context(gateway, stream) -> None:
    resp = _post(gateway.base_url, LONG, stream)
    assert resp.status_code == 200, resp.text
    assert resp.headers["x-kiban-engine"] == "large"
    if stream:
        assert resp.text.rstrip().endswith("data: [DONE]")
    rid = resp.headers["x-request-id"]
    line = next(
        ln for ln in gateway.wait_for_log(f'"request_id":"{rid}"').splitlines() if rid in ln
    )
    entry = json.loads(line)
    assert entry["attempts"] == 2 and entry["retries"] == ["context_length"]
    resp = _post(gateway.base_url, SHORT, stream)
    assert resp.status_code == 200 and resp.headers["x-kiban-engine"] == "small"
