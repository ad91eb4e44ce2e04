"""`kiban bench`'s stream timing and target parsing, on bytes as servers send them."""

from __future__ import annotations

import json

import pytest

from kiban.bench.sse import StreamTimer, body_usage
from kiban.bench.workload import Destination, Workload, WorkloadError, parse_header


def _event(delta: dict | None, *, usage: dict | None = None, spaced: bool = False) -> bytes:
    choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": None}]
    body: dict = {"id": "c", "object": "chat.completion.chunk", "choices": choices}
    if usage is not None:
        body["usage"] = usage
    text = json.dumps(body) if spaced else json.dumps(body, separators=(",", ":"))
    return b"data: " + text.encode() + b"\n\n"


# vLLM's shape: a role chunk with empty content, tokens, a finish chunk, a usage chunk
STREAM = (
    _event({"role": "assistant", "content": ""})
    + b"".join(_event({"content": f" w{i}"}) for i in range(5))
    + _event({"content": ""})
    + _event(None, usage={"prompt_tokens": 7, "completion_tokens": 5, "total_tokens": 12})
    + b"data: [DONE]\n\n"
)


def _feed(pieces: list[bytes]) -> StreamTimer:
    timer = StreamTimer()
    for i, piece in enumerate(pieces):
        timer.feed(piece, float(i))
    return timer


def test_stream_counts_tokens_events_and_usage() -> None:
    timer = _feed([STREAM])
    assert timer.done
    assert timer.events == 8  # [DONE] is not an event
    assert timer.token_events == 5  # the role and finish chunks carry no text
    assert (timer.prompt_tokens, timer.completion_tokens) == (7, 5)
    assert timer.error_event is None


@pytest.mark.parametrize("size", [1, 2, 3, 7, 64])
def test_stream_split_anywhere_gives_the_same_counts(size: int) -> None:
    whole = _feed([STREAM])
    timer = _feed([STREAM[i : i + size] for i in range(0, len(STREAM), size)])
    assert (timer.events, timer.token_events, timer.done) == (
        whole.events,
        whole.token_events,
        whole.done,
    )
    assert timer.completion_tokens == 5
    assert len(timer.gaps) == 4


def test_token_times_are_when_their_bytes_arrived() -> None:
    role = _event({"role": "assistant", "content": ""})
    first, second = _event({"content": "a"}), _event({"content": "b"})
    timer = StreamTimer()
    timer.feed(role, 1.0)
    timer.feed(first, 2.5)
    timer.feed(second + b"data: [DONE]\n\n", 4.0)
    assert timer.first_token == 2.5
    assert timer.gaps == [1.5]


def test_crlf_comments_spaced_json_and_completions() -> None:
    text_events = [
        b'data: {"choices": [{"text": "Hello", "index": 0}]}',
        b": keep-alive comment",
        b'data: {"choices": [{"text": "", "index": 0, "finish_reason": "length"}]}',
        b'data: {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 9}}',
        b"data: [DONE]",
    ]
    body = b"\r\n\r\n".join(text_events) + b"\r\n\r\n"
    timer = _feed([body[i : i + 5] for i in range(0, len(body), 5)])
    assert timer.token_events == 1
    assert timer.events == 3
    assert (timer.prompt_tokens, timer.completion_tokens) == (3, 9)
    assert timer.done


def test_reasoning_and_tool_call_deltas_count_as_tokens() -> None:
    timer = _feed(
        [
            _event({"reasoning_content": "think"})
            + _event({"tool_calls": [{"index": 0, "function": {"arguments": '{"a"'}}]})
            + _event({"content": None})
        ]
    )
    assert timer.token_events == 2


def test_error_event_is_kept() -> None:
    error = b'data: {"error": {"message": "engine broke", "code": "upstream_stream_broken"}}\n\n'
    timer = _feed([_event({"content": "a"}) + error])
    assert timer.error_event is not None and b"engine broke" in timer.error_event
    assert not timer.done


def test_content_mentioning_usage_or_error_is_not_taken_for_them() -> None:
    tricky = {"content": 'say "completion_tokens": 99 and {"error": 1}'}
    timer = _feed([_event(tricky) + b"data: [DONE]\n\n"])
    assert timer.completion_tokens is None
    assert timer.error_event is None
    assert timer.token_events == 1


def test_body_usage() -> None:
    body = json.dumps(
        {
            "choices": [{"message": {"content": "x"}}],
            "usage": {"prompt_tokens": 4, "completion_tokens": 2},
        }
    ).encode()
    assert body_usage(body) == (4, 2)
    assert body_usage(b'{"choices": []}') == (None, None)


@pytest.mark.parametrize(
    ("url", "endpoint", "expected"),
    [
        (
            "http://127.0.0.1:8000",
            None,
            ("http", "127.0.0.1", 8000, "/v1/chat/completions", "chat"),
        ),
        ("http://h:8000/v1/", "completions", ("http", "h", 8000, "/v1/completions", "completions")),
        (
            "https://api.example/v1/chat/completions",
            None,
            ("https", "api.example", 443, "/v1/chat/completions", "chat"),
        ),
        (
            "http://h/openai/v1/completions",
            None,
            ("http", "h", 80, "/openai/v1/completions", "completions"),
        ),
        ("http://[::1]:9000/v1", None, ("http", "::1", 9000, "/v1/chat/completions", "chat")),
    ],
)
def test_target_from_url(url: str, endpoint: str | None, expected: tuple) -> None:
    target = Destination.from_url(url, endpoint)  # type: ignore[arg-type]
    assert (target.scheme, target.host, target.port, target.path, target.endpoint) == expected


def test_target_models_path_and_authority() -> None:
    target = Destination.from_url("http://[::1]:9000/v1")
    assert target.models_path == "/v1/models"
    assert target.authority == "[::1]:9000"
    assert Destination.from_url("https://h/x/v1/completions").models_path == "/x/v1/models"


@pytest.mark.parametrize(
    ("url", "endpoint", "message"),
    [
        ("127.0.0.1:8000", None, "expected an http:// or https:// URL"),
        ("http://h/v1/chat/completions", "completions", "is a chat endpoint, not completions"),
        ("http://h/v1?x=1", None, "must not have a query"),
    ],
)
def test_target_errors_say_what_to_give(url: str, endpoint: str | None, message: str) -> None:
    with pytest.raises(WorkloadError, match=message):
        Destination.from_url(url, endpoint)  # type: ignore[arg-type]


def test_requests_are_complete_http_messages() -> None:
    workload = Workload(
        Destination.from_url("http://h:1/v1"),
        "m",
        stream=True,
        max_tokens=8,
        extra_body={"temperature": 0},
        headers=(parse_header("X-Trace: abc"),),
        api_key="sk-1",
    )
    (raw,) = workload.raw_requests()
    head, body = raw.split(b"\r\n\r\n", 1)
    lines = head.decode().split("\r\n")
    assert lines[0] == "POST /v1/chat/completions HTTP/1.1"
    assert "Host: h:1" in lines and "Authorization: Bearer sk-1" in lines
    assert "X-Trace: abc" in lines and f"Content-Length: {len(body)}" in lines
    assert json.loads(body) == {
        "model": "m",
        "messages": [{"role": "user", "content": workload.prompts[0]}],
        "max_tokens": 8,
        "stream": True,
        "stream_options": {"include_usage": True},
        "temperature": 0,
    }


@pytest.mark.parametrize("bad", ["no colon", ": empty name", "X: a\r\nInjected: b", "Bad Name: v"])
def test_bad_headers_are_refused(bad: str) -> None:
    with pytest.raises(WorkloadError, match="Name: value"):
        parse_header(bad)
