"""A real vLLM (CPU build) serving the tiny model: the API surface kiban relies on."""

from __future__ import annotations

import json
import re
import time
import urllib.request
from pathlib import Path

import pytest
from openai import OpenAI
from tokenizers import Tokenizer

from kiban.models.tiny import IM_END, IM_START
from kiban.processes import group_members
from tests.support.engines import EngineProcess
from tests.support.openai_checks import assert_streamed_chat_with_usage

pytestmark = pytest.mark.engine

MODEL = "tiny"
MESSAGES = [{"role": "user", "content": "Say something about licences."}]


@pytest.fixture(scope="module")
def engine(vllm_engine_factory, tiny_model_dir: Path) -> EngineProcess:
    eng = vllm_engine_factory(tiny_model_dir, MODEL)
    print(f"vLLM healthy after {eng.startup_seconds:.1f}s on {eng.base_url}")
    return eng


@pytest.fixture(scope="module")
def client(engine: EngineProcess) -> OpenAI:
    return OpenAI(base_url=f"{engine.base_url}/v1", api_key="unused", max_retries=0, timeout=120)


def _get(url: str) -> tuple[int, str]:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return resp.status, resp.read().decode()


def _prompt_token_count(model_dir: Path) -> int:
    """Tokens of MESSAGES after our ChatML template, counted with our own tokenizer."""
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    text = "".join(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in MESSAGES)
    return len(tok.encode(text + f"{IM_START}assistant\n").ids)


def test_models_lists_served_name(engine: EngineProcess) -> None:
    status, body = _get(f"{engine.base_url}/v1/models")
    assert status == 200
    assert [m["id"] for m in json.loads(body)["data"]] == [MODEL]


def test_chat_completion(client: OpenAI, tiny_model_dir: Path) -> None:
    resp = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=16, temperature=0.0
    )
    choice = resp.choices[0]
    assert isinstance(choice.message.content, str)
    assert choice.finish_reason in {"stop", "length"}
    assert 0 < resp.usage.completion_tokens <= 16
    # vLLM applied the chat template shipped in tokenizer_config.json
    assert resp.usage.prompt_tokens == _prompt_token_count(tiny_model_dir)


def test_streamed_chat_completion(client: OpenAI) -> None:
    assert_streamed_chat_with_usage(client, MODEL, MESSAGES)


def test_metrics_have_vllm_names(engine: EngineProcess, client: OpenAI) -> None:
    client.completions.create(model=MODEL, prompt="Hello", max_tokens=4)
    status, body = _get(f"{engine.base_url}/metrics")
    assert status == 200
    names = set(re.findall(r"^(vllm:[a-z_:]+)", body, flags=re.MULTILINE))
    assert "vllm:num_requests_running" in names
    assert any(n.startswith("vllm:generation_tokens") for n in names)


def test_log_reports_kv_cache_size(engine: EngineProcess) -> None:
    lines = [ln for ln in engine.log_tail(10**7).splitlines() if "KV cache" in ln]
    print("\n".join(lines))
    assert any(re.search(r"KV cache size: [\d,]+ tokens", ln) for ln in lines)


def test_crash_and_restart_on_same_port(engine: EngineProcess, client: OpenAI) -> None:
    """Runs last: kill() leaves nothing behind, restart() serves again on the port."""
    old_pid, port = engine.pid, engine.port
    assert old_pid is not None and len(group_members(old_pid)) > 1  # API server + EngineCore
    assert engine.kill() == -9
    assert not engine.running() and not engine.healthy()
    deadline = time.monotonic() + 5  # SIGKILL lands asynchronously on the group
    while group_members(old_pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert group_members(old_pid) == set()
    engine.restart()
    print(f"vLLM restarted in {engine.startup_seconds:.1f}s")
    assert engine.port == port and engine.pid != old_pid
    resp = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4)
    assert resp.usage.completion_tokens > 0
