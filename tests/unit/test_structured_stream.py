"""Streamed content is accumulated from complete events; [DONE] is held back."""

from __future__ import annotations

import orjson

from kiban.structured.stream import DONE_EVENT, StreamAccumulator


def event(content: str | None = None, finish: str | None = None, index: int = 0) -> bytes:
    delta = {} if content is None else {"content": content}
    choice = {"index": index, "delta": delta, "finish_reason": finish}
    return b"data: " + orjson.dumps({"choices": [choice]}) + b"\n\n"


def test_split_events_and_done_held_back() -> None:
    raw = event('{"a"') + event(": 1}") + event(None, "stop") + DONE_EVENT
    acc = StreamAccumulator()
    forwarded = b""
    for i in range(0, len(raw), 7):  # engine bytes arrive in arbitrary pieces
        forwarded += acc.feed(raw[i : i + 7])
    assert acc.done
    assert forwarded == raw[: -len(DONE_EVENT)]  # byte-identical, minus [DONE]
    assert acc.choices() == [('{"a": 1}', "stop")]


def test_several_choices_and_error_event() -> None:
    acc = StreamAccumulator()
    acc.feed(event("x", index=0) + event("y", index=1) + event(None, "length", index=1))
    acc.feed(b'data: {"error": {"message": "boom"}}\n\n')
    assert acc.choices() == [("x", None), ("y", "length")]
    assert acc.error == {"message": "boom"}
    assert not acc.done
