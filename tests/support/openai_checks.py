"""Checks of an engine's OpenAI-compatible answers, shared by the engine tests."""

from __future__ import annotations

from openai import OpenAI


def assert_streamed_chat_with_usage(
    client: OpenAI, model: str, messages: list[dict], max_tokens: int = 12
) -> None:
    """A streamed chat completion brings several content deltas, a finish reason at the
    end and a usage chunk within ``max_tokens``."""
    stream = client.chat.completions.create(
        model=model,
        messages=messages,
        max_tokens=max_tokens,
        temperature=0.0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    deltas = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    usage = [c.usage for c in chunks if c.usage]
    assert len(deltas) > 1 and "".join(deltas)
    assert finishes[-1] in {"stop", "length"}
    assert usage and 0 < usage[-1].completion_tokens <= max_tokens
