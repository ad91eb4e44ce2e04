"""Accumulating the content of a streamed completion, for verification at its end.

Only complete SSE events are forwarded (byte slices of what the engine sent,
never re-serialised), and the final ``data: [DONE]`` is held back: the gateway
sends it only once the assembled content has passed verification, and an
error event instead when it has not.
"""

from __future__ import annotations

from typing import Any

import orjson

DONE_EVENT = b"data: [DONE]\n\n"


class StreamAccumulator:
    """Feed it the engine's bytes; it returns what may go to the client now."""

    __slots__ = ("_parts", "_pending", "done", "error", "finish_reasons")

    def __init__(self) -> None:
        self._pending = b""
        self._parts: dict[int, list[str]] = {}
        self.finish_reasons: dict[int, str | None] = {}
        self.done = False
        self.error: dict[str, Any] | None = None

    def feed(self, chunk: bytes) -> bytes:
        """The complete events in ``pending + chunk`` (without [DONE]); keeps the rest."""
        data = self._pending + chunk if self._pending else chunk
        end = data.rfind(b"\n\n")
        if end < 0:
            self._pending = data
            return b""
        complete, self._pending = data[: end + 2], data[end + 2 :]
        for event in complete.split(b"\n\n")[:-1]:
            self._event(event)
        if self.done:
            complete = complete.replace(DONE_EVENT, b"")
        return complete

    def choices(self) -> list[tuple[str | None, str | None]]:
        """``(content, finish_reason)`` per choice index, as a non-streamed body has them."""
        indexes = sorted(self._parts.keys() | self.finish_reasons.keys())
        return [
            ("".join(self._parts.get(i, ())) or None, self.finish_reasons.get(i)) for i in indexes
        ]

    def _event(self, event: bytes) -> None:
        for line in event.split(b"\n"):
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                self.done = True
                continue
            try:
                obj = orjson.loads(data)
            except orjson.JSONDecodeError:
                continue
            if not isinstance(obj, dict):
                continue
            if isinstance(obj.get("error"), dict):
                self.error = obj["error"]
            for choice in obj.get("choices") or ():
                self._choice(choice)

    def _choice(self, choice: Any) -> None:
        if not isinstance(choice, dict):
            return
        index = choice.get("index", 0)
        delta = choice.get("delta")
        piece = delta.get("content") if isinstance(delta, dict) else choice.get("text")
        if isinstance(piece, str) and piece:
            self._parts.setdefault(index, []).append(piece)
        reason = choice.get("finish_reason")
        if reason is not None or index not in self.finish_reasons:
            self.finish_reasons[index] = reason
