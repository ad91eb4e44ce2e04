"""Which streams may be continued, and the request that asks another engine for the rest."""

from __future__ import annotations

import pytest

from kiban.config import EngineConfig
from kiban.gateway.continuation import (
    StreamRecord,
    continuable,
    continuation_body,
    whole_events,
)
from kiban.gateway.engines import Engine
from kiban.gateway.targets import Target

CHAT = [{"role": "user", "content": "hi"}]


def _target(kind: str, **launch) -> Target:
    config = {"name": "b", "kind": kind, "url": "http://127.0.0.1:9", "models": ["m"]}
    if launch:
        config["launch"] = {"model": "/models/m", **launch}
    return Target(Engine.from_config(EngineConfig.model_validate(config)), "served-m")


def _record(*contents: str) -> StreamRecord:
    record = StreamRecord()
    role = b'data: {"id":"x","created":1,"model":"m","choices":[{"delta":{"role":"assistant"}}]}'
    events = [role] + [
        b'data: {"choices":[{"delta":{"content":"' + c.encode() + b'"}}]}' for c in contents
    ]
    sent = record.feed(b"\n\n".join(events) + b'\n\ndata: {"cho')  # half an event at the end
    assert not sent.endswith(b'{"cho') and record.pending == b'data: {"cho'
    record.read_sent()
    return record


def test_the_text_and_tokens_sent_are_read_from_whole_events_only() -> None:
    # vLLM sends an empty delta for a token that ends inside a character: it counts
    record = _record("Hel", "", "lo")
    assert (record.text, record.tokens, record.id, record.created) == ("Hello", 3, "x", 1)


def test_only_whole_events_pass() -> None:
    assert whole_events(b"", b"data: {") == (b"", b"data: {")
    assert whole_events(b"data: {", b"}\n\ndata") == (b"data: {}\n\n", b"data")
    assert whole_events(b"", b"data: 1\n\n") == (b"data: 1\n\n", b"")


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ({}, True),
        ({"response_format": {"type": "text"}, "tools": [], "n": 1, "logprobs": False}, True),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, False),
        ({"tool_choice": "none"}, False),
        ({"response_format": {"type": "json_object"}}, False),
        ({"guided_json": {"type": "object"}}, False),
        ({"structured_outputs": {"regex": "a+"}}, False),
        ({"n": 2}, False),
        ({"logprobs": True}, False),
        ({"messages": [*CHAT, {"role": "assistant", "content": "Sure"}]}, False),
    ],
)
def test_what_can_be_continued(extra: dict, expected: bool) -> None:
    assert continuable({"messages": CHAT, **extra}) is expected


def test_the_continuation_request_for_vllm() -> None:
    payload = {
        "model": "public",
        "messages": CHAT,
        "max_tokens": 100,
        "min_tokens": 50,
        "stream": True,
        "temperature": 0,
    }
    body = continuation_body(payload, _target("vllm"), _record("Hel", "lo"))
    assert body == {
        "model": "served-m",
        "messages": [*CHAT, {"role": "assistant", "content": "Hello"}],
        "max_tokens": 98,
        "min_tokens": 48,
        "stream": True,
        "stream_options": {"include_usage": True},
        "temperature": 0,
        "continue_final_message": True,
        "add_generation_prompt": False,
    }
    assert payload["messages"] == CHAT  # the client's request is left as it was


def test_each_engine_kind_says_how_it_continues() -> None:
    fields = {
        kind: _target(kind).engine.dialect.continuation_fields(_target(kind).engine.config)
        for kind in ("vllm", "llamacpp", "sglang", "lmdeploy", "openai")
    }
    assert fields == {
        "vllm": {"continue_final_message": True, "add_generation_prompt": False},
        "llamacpp": {"continue_final_message": True, "add_generation_prompt": False},
        "sglang": {"continue_final_message": True},
        "lmdeploy": {},
        "openai": None,
    }
    legacy = _target("llamacpp", args=["--no-jinja"]).engine
    assert legacy.dialect.continuation_fields(legacy.config) is None
