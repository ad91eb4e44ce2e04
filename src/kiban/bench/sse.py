"""Timing an OpenAI Server-Sent Events stream from its bytes, without parsing each chunk.

Events are split on blank lines as they arrive. An event counts as a *token
event* when a text field of its delta is non-empty (``content``, ``text``,
``reasoning_content``, ``reasoning``, or a tool call's ``arguments``); the
first one gives the time to first token, the gaps between the following ones
the inter-token latencies. Only byte searches run per event; the token counts
come from the ``usage`` the last chunk carries (``stream_options.include_usage``).
"""

from __future__ import annotations

import re

_TOKEN = re.compile(rb'"(?:content|text|reasoning_content|reasoning|arguments)"\s*:\s*"(?!")')
_ERROR = re.compile(rb'data:\s*\{\s*"error"\s*:')
_COMPLETION_TOKENS = re.compile(rb'"completion_tokens"\s*:\s*(\d+)')
_PROMPT_TOKENS = re.compile(rb'"prompt_tokens"\s*:\s*(\d+)')


class StreamTimer:
    """Counts and times the events of one SSE response body, fed piece by piece."""

    __slots__ = (
        "completion_tokens",
        "done",
        "error_event",
        "events",
        "first_token",
        "gaps",
        "last_token",
        "pending",
        "prompt_tokens",
        "token_events",
    )

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Forget the previous response."""
        self.pending = b""
        self.events = 0  # data events, [DONE] not counted
        self.token_events = 0
        self.first_token = 0.0
        self.last_token = 0.0
        self.gaps: list[float] = []
        self.done = False  # saw data: [DONE]
        self.error_event: bytes | None = None  # the first `data: {"error": ...}` event
        self.completion_tokens: int | None = None
        self.prompt_tokens: int | None = None

    def feed(self, data: bytes, now: float) -> None:
        """Scan the next piece of the body, received at *now* (perf_counter seconds)."""
        if self.pending:
            data = self.pending + data
        if b"\r" in data:
            data = data.replace(b"\r\n", b"\n")
        find = data.find
        start = 0
        while (end := find(b"\n\n", start)) >= 0:
            event = data[start:end]
            start = end + 2
            if not event.startswith(b"data:"):
                if b"\ndata:" not in event:
                    continue  # a comment (": ping") or a field without data
                event = event[event.index(b"\ndata:") + 1 :]
            if b"[DONE]" in event[:14]:
                self.done = True
                continue
            self.events += 1
            if _TOKEN.search(event) is not None:
                if self.token_events:
                    self.gaps.append(now - self.last_token)
                else:
                    self.first_token = now
                self.last_token = now
                self.token_events += 1
            if b'_tokens"' in event:
                self._usage(event)
            if self.error_event is None and b'"error"' in event and _ERROR.match(event):
                self.error_event = event
        self.pending = data[start:] if start < len(data) else b""

    def _usage(self, event: bytes) -> None:
        completion = _COMPLETION_TOKENS.search(event)
        if completion is not None:
            self.completion_tokens = int(completion.group(1))
        prompt = _PROMPT_TOKENS.search(event)
        if prompt is not None:
            self.prompt_tokens = int(prompt.group(1))


def body_usage(body: bytes) -> tuple[int | None, int | None]:
    """``(prompt_tokens, completion_tokens)`` of a non-streamed response body, if present."""
    at = body.rfind(b'"usage"')
    if at < 0:
        return None, None
    tail = body[at:]
    prompt, completion = _PROMPT_TOKENS.search(tail), _COMPLETION_TOKENS.search(tail)
    return (
        int(prompt.group(1)) if prompt else None,
        int(completion.group(1)) if completion else None,
    )
