"""`kiban up` with REAL engines: vLLM's CPU build and llama.cpp's llama-server, from their
isolated environments, behind one route; one engine is killed and comes back."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
import yaml
from openai import OpenAI

from kiban.deploy.envs import ensure_engine_env
from tests.integration.test_supervisor import _status, _wait_for
from tests.support.cli import kiban, kiban_up_detached
from tests.support.engines import free_port
from tests.support.load import background_load

pytestmark = pytest.mark.engine

MESSAGES = [{"role": "user", "content": "Say something about licences."}]


@pytest.fixture(scope="module")
def up(tiny_model_dir: Path, tiny_gguf: Path, tmp_path_factory: pytest.TempPathFactory):
    ensure_engine_env("llamacpp-cpu", progress=print)  # built once per machine (minutes)
    ensure_engine_env("vllm-cpu", progress=print)
    port = free_port()
    config = {
        "gateway": {"port": port, "health_interval_s": 0.5},
        "engines": [
            {
                "name": "vllm",
                "kind": "vllm",
                "models": ["tiny"],
                "launch": {
                    "model": str(tiny_model_dir),
                    "device": "cpu",
                    "port": free_port(),
                    "args": ["--max-model-len", "2048"],
                    "env": {"VLLM_CPU_KVCACHE_SPACE": "1"},
                },
            },
            {
                "name": "llama",
                "kind": "llamacpp",
                "models": ["tiny"],
                "launch": {
                    "model": str(tiny_gguf),
                    "device": "cpu",
                    "port": free_port(),
                    "args": ["-c", "2048", "-np", "2", "-ngl", "0"],
                    "restart": {"backoff_s": 0.5},
                },
            },
        ],
        "routes": [{"model": "tiny", "engines": ["vllm", "llama"], "strategy": "round_robin"}],
    }
    path = tmp_path_factory.mktemp("up") / "kiban.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    with kiban_up_detached(path, timeout=900):
        yield path, f"http://127.0.0.1:{port}/v1"


def test_both_engines_serve_through_the_gateway(up) -> None:
    config, base_url = up
    status = _status(config)
    assert {n: s["state"] for n, s in status.items()} == {
        "vllm": "running",
        "llama": "running",
        "gateway": "running",
    }
    assert status["vllm"]["device"] == "cpu" and status["vllm"]["gpus"] == []
    client = OpenAI(base_url=base_url, api_key="none", max_retries=0)
    seen = set()
    for _ in range(4):
        raw = client.chat.completions.with_raw_response.create(
            model="tiny", messages=MESSAGES, max_tokens=8
        )
        assert raw.parse().usage.completion_tokens > 0
        seen.add(raw.headers["x-kiban-engine"])
    assert seen == {"vllm", "llama"}


def test_status_shows_live_figures_under_load(up) -> None:
    config, base_url = up
    client = OpenAI(base_url=base_url, api_key="none", max_retries=0, timeout=60)

    def one_request() -> None:
        client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=64)

    with background_load(one_request, workers=2, max_requests=200, max_seconds=120) as load:
        while not load.results and load.failure_count == 0:  # both engines busy from now on
            time.sleep(0.05)
        result = kiban("status", "-c", str(config), "--json")
    assert load.failure_count == 0, load.describe_failures()
    document = json.loads(result.stdout)
    live = {p["name"]: p.get("live") for p in document["processes"]}
    assert live["vllm"] is not None and live["llama"] is not None
    assert live["vllm"]["tokens_per_s"] + live["llama"]["tokens_per_s"] > 0
    assert document["in_flight"] is not None


def test_killed_engine_fails_over_and_comes_back(up) -> None:
    config, base_url = up
    client = OpenAI(base_url=base_url, api_key="none", max_retries=0)
    llama = _status(config)["llama"]
    os.kill(llama["pid"], signal.SIGKILL)
    for _ in range(10):  # at once: every request is answered, by vLLM
        raw = client.chat.completions.with_raw_response.create(
            model="tiny", messages=MESSAGES, max_tokens=4
        )
        assert raw.parse().choices[0].message.content is not None
    _wait_for(
        lambda: (
            _status(config)["llama"]["state"] == "running"
            and _status(config)["llama"]["pid"] != llama["pid"]
        ),
        timeout=120,
        what="llama restarted by the supervisor",
    )
    assert _status(config)["llama"]["restarts"] == 1
    seen: set[str] = set()
    _wait_for(
        lambda: (
            seen.add(
                client.chat.completions.with_raw_response.create(
                    model="tiny", messages=MESSAGES, max_tokens=2
                ).headers["x-kiban-engine"]
            )
            or "llama" in seen
        ),
        timeout=30,
        what="llama takes traffic again",
    )
