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
    return Target(Engine.from_config(EngineConfig.model_validate(config)), "served-m", bit=1)


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


def test_the_engine_count_of_tokens_sent_wins_over_the_events() -> None:
    # a loaded vLLM merged 7 tokens into these 3 events; its per-event usage says so
    record = _record("Hel", "", "lo")
    record.engine_count(7, {"prompt_tokens": 12, "completion_tokens": 7, "total_tokens": 19})
    assert (record.text, record.tokens, record.prompt_tokens) == ("Hello", 7, 12)
    record = _record("Hel", "lo")
    record.engine_count(None, None)  # an engine without a count: the events are counted
    assert (record.tokens, record.prompt_tokens) == (2, None)


def test_each_engine_kind_says_how_it_counts_the_tokens_it_streams() -> None:
    payload = {"model": "m", "stream_options": {"include_usage": True}}
    asked = {
        kind: (_target(kind).engine.dialect.token_count or None)
        for kind in ("vllm", "llamacpp", "sglang", "lmdeploy", "openai")
    }
    assert {kind: c.ask(payload) if c else None for kind, c in asked.items()} == {
        "vllm": {
            "model": "m",
            "stream_options": {"include_usage": True, "continuous_usage_stats": True},
        },
        "sglang": {
            "model": "m",
            "stream_options": {"include_usage": True, "continuous_usage_stats": True},
        },
        "llamacpp": {**payload, "timings_per_token": True},
        "lmdeploy": None,
        "openai": None,
    }
    vllm = asked["vllm"]
    assert vllm is not None and (vllm.key, vllm.count) == ("usage", "completion_tokens")
    # a client that asked for it itself: nothing added, and it gets what it asked
    own = {"stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    assert vllm.ask(own) is None


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
        # vLLM's usage on every event: its own count, should b break too
        "stream_options": {"include_usage": True, "continuous_usage_stats": True},
        "temperature": 0,
        "continue_final_message": True,
        "add_generation_prompt": False,
    }
    assert payload["messages"] == CHAT  # the client's request is left as it was
    llamacpp = continuation_body(payload, _target("llamacpp"), _record("Hel", "lo"))
    assert llamacpp["timings_per_token"] is True


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
