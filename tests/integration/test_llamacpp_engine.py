"""A real llama.cpp ``llama-server`` (built from the pinned sdist) serving the tiny GGUF."""

from __future__ import annotations

import json
import re
import time
import urllib.request
from pathlib import Path

import jsonschema
import openai
import pytest
from openai import OpenAI

from kiban.engines.llamacpp import MIB, LlamaCppDialect, LlamaCppStartupLog
from kiban.models.tiny import IM_END, IM_START, TinySpec, train_tokenizer
from kiban.processes import group_members
from tests.support.engines import EngineProcess, EngineStartError
from tests.support.openai_checks import assert_streamed_chat_with_usage

pytestmark = pytest.mark.engine

MODEL = "tiny"
CTX = 2048
MESSAGES = [{"role": "user", "content": "Say something about licences."}]
STARTUP_LOG = LlamaCppStartupLog()
DIALECT = LlamaCppDialect()
SPEC = TinySpec()

# Everything bounded (maxLength, maxItems, enum, integer range) so that guided decoding
# must close the object well inside max_tokens, even with random weights.
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 16},
        "count": {"type": "integer", "minimum": 0, "maximum": 999},
        "kind": {"enum": ["alpha", "beta", "gamma"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 3},
    },
    "required": ["name", "count", "kind", "tags"],
    "additionalProperties": False,
}
NAMED_SCHEMA = {"name": "item", "schema": SCHEMA}


@pytest.fixture(scope="module")
def engine(llamacpp_engine_factory, tiny_gguf: Path) -> EngineProcess:
    eng = llamacpp_engine_factory(tiny_gguf, MODEL, ctx=CTX, parallel=2)
    print(f"llama-server healthy after {eng.startup_seconds:.1f}s on {eng.base_url}")
    return eng


@pytest.fixture(scope="module")
def client(engine: EngineProcess) -> OpenAI:
    return OpenAI(base_url=f"{engine.base_url}/v1", api_key="unused", max_retries=0, timeout=120)


def _get(url: str) -> tuple[int, str]:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return resp.status, resp.read().decode()


def _prompt_token_count() -> int:
    """Tokens of MESSAGES after our ChatML template, counted with the tiny model's tokenizer."""
    tok = train_tokenizer(SPEC.vocab_size)
    text = "".join(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in MESSAGES)
    return len(tok.encode(text + f"{IM_START}assistant\n").ids)


def test_health(engine: EngineProcess) -> None:
    status, body = _get(f"{engine.base_url}/health")
    assert status == 200 and json.loads(body) == {"status": "ok"}


def test_models_lists_the_alias(engine: EngineProcess) -> None:
    status, body = _get(f"{engine.base_url}/v1/models")
    assert status == 200
    assert [m["id"] for m in json.loads(body)["data"]] == [MODEL]


def test_startup_report_of_the_running_engine(engine: EngineProcess) -> None:
    report = STARTUP_LOG.report(engine.log_tail(10**7))
    assert report.device == "cpu" and report.errors == []
    assert report.kv_cache_tokens == CTX


def test_chat_completion(client: OpenAI) -> None:
    resp = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=16, temperature=0.0
    )
    choice = resp.choices[0]
    assert isinstance(choice.message.content, str)
    assert choice.finish_reason in {"stop", "length"}
    assert 0 < resp.usage.completion_tokens <= 16
    # llama-server applied the GGUF's chat template and the GGUF's BPE vocabulary
    assert resp.usage.prompt_tokens == _prompt_token_count()


def test_completion(client: OpenAI) -> None:
    resp = client.completions.create(model=MODEL, prompt="Hello", max_tokens=8, temperature=0.0)
    assert isinstance(resp.choices[0].text, str)
    assert resp.choices[0].finish_reason in {"stop", "length"}
    assert 0 < resp.usage.completion_tokens <= 8


def test_streamed_chat_completion_with_usage(client: OpenAI) -> None:
    assert_streamed_chat_with_usage(client, MODEL, MESSAGES)


def test_metrics_have_llamacpp_names(engine: EngineProcess, client: OpenAI) -> None:
    client.completions.create(model=MODEL, prompt="Hello", max_tokens=4)
    status, body = _get(f"{engine.base_url}/metrics")
    assert status == 200
    values = dict(re.findall(r"^(llamacpp:[a-z_]+) (\S+)$", body, flags=re.MULTILINE))
    assert {"llamacpp:prompt_tokens_total", "llamacpp:requests_processing"} <= set(values)
    assert float(values["llamacpp:tokens_predicted_total"]) > 0


@pytest.mark.parametrize(
    "constraint",
    [
        {"json_schema": SCHEMA},
        {"response_format": {"type": "json_schema", "json_schema": NAMED_SCHEMA}},
    ],
    ids=["json_schema-field", "response_format"],
)
def test_schema_makes_random_weights_write_valid_json(client: OpenAI, constraint: dict) -> None:
    resp = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Describe an item as JSON."}],
        max_tokens=256,
        temperature=0.0,
        extra_body=constraint,
    )
    choice = resp.choices[0]
    print(repr(choice.message.content))
    assert choice.finish_reason == "stop"
    jsonschema.validate(json.loads(choice.message.content), SCHEMA)


def test_errors_are_openai_shaped(client: OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model=MODEL, messages=MESSAGES, max_tokens=4, response_format={"type": "bogus"}
        )
    body = info.value.response.content
    error = json.loads(body)["error"]
    assert error["code"] == 400 and error["type"] == "invalid_request_error"
    assert "response_format type must be one of" in error["message"]
    assert DIALECT.error_to_openai(400, body) == body


def _kv_bytes_per_cell(type_k: str, type_v: str) -> float:
    """2 layers x 2 KV heads x head_dim 64 values each for K and V; ggml q8_0 = 34 B / 32."""
    size = {"f16": 2.0, "q8_0": 34 / 32}
    values = SPEC.num_layers * SPEC.num_kv_heads * SPEC.head_dim
    return values * (size[type_k] + size[type_v])


@pytest.mark.parametrize(
    ("type_k", "type_v", "unified"),
    [("f16", "f16", False), ("q8_0", "q8_0", False), ("q8_0", "f16", True)],
)
def test_kv_cache_size_matches_the_arithmetic(
    llamacpp_engine_factory, tiny_gguf: Path, type_k: str, type_v: str, unified: bool
) -> None:
    ctx = 8192  # -np 2 without --kv-unified: two streams of 4096 cells each
    args = ("-fa", "on", "-ctk", type_k, "-ctv", type_v, *(["--kv-unified"] if unified else []))
    engine = llamacpp_engine_factory(tiny_gguf, "kv", ctx=ctx, parallel=2, extra_args=args)
    try:
        report = STARTUP_LOG.report(engine.log_tail(10**7))
    finally:
        engine.stop()
    expected = ctx * _kv_bytes_per_cell(type_k, type_v)
    assert report.kv_cache_tokens == ctx
    # llama.cpp prints MiB with two decimals: compare what it would print for the arithmetic
    assert f"{report.kv_cache_bytes / MIB:.2f}" == f"{expected / MIB:.2f}"


def test_quantized_v_cache_without_flash_attention_fails(
    llamacpp_engine_factory, tiny_gguf: Path
) -> None:
    args = ("-fa", "off", "-ctv", "q8_0")
    engine = llamacpp_engine_factory(tiny_gguf, "qv", start=False, extra_args=args)
    with pytest.raises(EngineStartError):
        engine.start(timeout=120)
    report = STARTUP_LOG.report(engine.log_tail(10**7))
    assert report.errors[0].endswith("quantized V cache requires flash_attn to be enabled")
    assert report.kv_cache_bytes is None


def test_crash_and_restart_on_same_port(engine: EngineProcess, client: OpenAI) -> None:
    """Runs last: kill() leaves nothing behind, restart() serves again on the port."""
    old_pid, port = engine.pid, engine.port
    assert old_pid is not None and group_members(old_pid) == {old_pid}  # one process
    assert engine.kill() == -9
    assert not engine.running() and not engine.healthy()
    deadline = time.monotonic() + 5  # SIGKILL lands asynchronously
    while group_members(old_pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert group_members(old_pid) == set()
    engine.restart()
    print(f"llama-server restarted in {engine.startup_seconds:.1f}s")
    assert engine.port == port and engine.pid != old_pid
    resp = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4)
    assert resp.usage.completion_tokens > 0
