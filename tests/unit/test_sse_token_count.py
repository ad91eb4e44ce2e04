"""EventStream reads an engine's per-event token count and keeps it from the client."""

from __future__ import annotations

import orjson
import pytest

from kiban.gateway.sse import EventStream, MalformedEvent

COUNT = ("usage", "completion_tokens")


def _event(text: str, tokens: int, finish: str | None = None) -> bytes:
    """A content event as vLLM 0.32 writes it with ``continuous_usage_stats``."""
    choice = {"index": 0, "delta": {"content": text}, "logprobs": None, "finish_reason": finish}
    usage = {"prompt_tokens": 9, "total_tokens": 9 + tokens, "completion_tokens": tokens}
    data = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m"}
    data |= {"choices": [choice], "usage": usage}
    return b"data: " + orjson.dumps(data) + b"\n\n"


FINAL = b'data: {"id":"c","choices":[],"usage":{"prompt_tokens":9,"completion_tokens":5}}\n\n'
DONE = b"data: [DONE]\n\n"


def _texts(relayed: bytes) -> list[dict]:
    return [orjson.loads(e[6:]) for e in relayed.split(b"\n\n")[:-1] if e != b"data: [DONE]"]


@pytest.mark.parametrize("together", [False, True])
def test_the_count_kiban_asked_for_is_read_and_taken_off(together: bool) -> None:
    chunks = [_event("a", 1), _event("bcd", 4), _event("e", 5, "length"), FINAL + DONE]
    stream = EventStream(count=COUNT, strip=True)
    if together:
        relayed = stream.feed(b"".join(chunks))
    else:
        relayed = b"".join(stream.feed(c) for c in chunks)
    events = _texts(relayed)
    assert [("usage" in e) for e in events] == [False, False, False, True]  # one usage, last
    assert events[-1]["usage"] == {"prompt_tokens": 9, "completion_tokens": 5}
    assert "".join(e["choices"][0]["delta"]["content"] for e in events[:-1]) == "abcde"
    assert stream.generated == 5 and stream.complete


def test_a_client_that_asked_for_the_count_gets_it() -> None:
    stream = EventStream(count=COUNT)
    assert stream.feed(_event("ab", 2)) == _event("ab", 2)  # the engine's own bytes
    assert stream.generated == 2


def test_without_usage_asked_nothing_of_it_reaches_the_client() -> None:
    stream = EventStream(count=COUNT, strip=True, drop_usage=True)
    relayed = stream.feed(_event("ab", 2) + FINAL + DONE)
    assert b"usage" not in relayed and relayed.endswith(DONE)
    assert stream.usage == {"prompt_tokens": 9, "completion_tokens": 5}


def test_llamacpp_timings_are_a_count_too() -> None:
    event = (
        b'data: {"choices":[{"index":0,"delta":{"content":"x"}}],"timings":{"predicted_n":2}}\n\n'
    )
    stream = EventStream(count=("timings", "predicted_n"), strip=True)
    assert stream.feed(event) == b'data: {"choices":[{"index":0,"delta":{"content":"x"}}]}\n\n'
    assert stream.generated == 2


def test_a_malformed_event_forgets_the_count_of_events_not_relayed() -> None:
    stream = EventStream(count=COUNT, strip=True)
    stream.feed(_event("a", 1))
    with pytest.raises(MalformedEvent):
        stream.feed(_event("bc", 3) + b'data: {"choices": [\n\n')
    assert stream.generated == 1  # "bc" never reached the client
