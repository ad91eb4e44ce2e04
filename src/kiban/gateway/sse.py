"""Checking an engine's server-sent events before any of them reaches the client.

:class:`EventStream` takes the engine's bytes as they come and returns the
complete events among them, byte for byte as the engine sent them (never
re-serialised). Every event is parsed first: its ``data`` must be a JSON
object or ``[DONE]``, and its other lines SSE fields (``event``, ``id``,
``retry``) or comments. An event that is not raises :class:`MalformedEvent`
and is never forwarded: the official SDKs fail on it, so kiban treats it as a
broken stream. On the way it learns what the end of a stream needs: whether
every choice finished (a ``finish_reason``), whether ``[DONE]`` came, the
usage, and an error the engine reported inside the stream.
"""

from __future__ import annotations

from typing import Any

import orjson

from kiban.errors import KibanError

_FIELDS = (b"event:", b"id:", b"retry:", b":")


class MalformedEvent(KibanError, ValueError):
    """An event that is not well-formed SSE carrying a JSON object or ``[DONE]``."""


class EventStream:
    """The state of one relayed stream; feed it the engine's bytes."""

    __slots__ = ("_pending", "_seen", "done", "error", "events", "finished", "usage")

    def __init__(self) -> None:
        self._pending = b""
        self._seen: set[int] = set()  # choice indexes seen
        self.finished: set[int] = set()  # choice indexes with a finish_reason
        self.done = False
        self.usage: dict[str, Any] | None = None
        self.error: dict[str, Any] | None = None  # an error event from the engine
        self.events = 0  # complete events taken

    def feed(self, data: bytes) -> bytes:
        """The complete events that end in ``pending + data``, checked; keeps the rest.

        Stops before an error event (it is not returned; ``error`` holds it).
        Raises :class:`MalformedEvent` for an event that does not parse.
        """
        if not self._pending and data[:6] == b"data: " and data.find(b"\n") == len(data) - 2:
            if data[-1:] != b"\n":  # one data line and a blank line: the usual read
                self._pending = data
                return b""
            return data if self._take(data[6:-2]) else b""
        if self._pending:
            data = self._pending + data
        if b"\r" in data:
            data = data.replace(b"\r\n", b"\n")
        end = data.rfind(b"\n\n")
        if end < 0:
            self._pending = data
            return b""
        self._pending = data[end + 2 :]
        events = data[:end].split(b"\n\n")
        for n, event in enumerate(events):
            payload: bytes | None
            if event[:6] == b"data: " and b"\n" not in event:
                payload = event[6:]
            elif event:
                payload = _data_of(event)
            else:
                continue  # a blank line more
            if payload is None:
                self.events += 1  # a comment or a keep-alive
            elif not self._take(payload):
                return b"".join(e + b"\n\n" for e in events[:n] if e)
        return data[: end + 2]

    def _take(self, payload: bytes) -> bool:
        """Check the data of one event; False (and nothing more is taken) for an error."""
        self.events += 1
        if payload == b"[DONE]":
            self.done = True
            return True
        try:
            obj = orjson.loads(payload)
        except orjson.JSONDecodeError as err:
            raise MalformedEvent(f"invalid JSON ({err}): {_show(payload)}") from None
        if type(obj) is not dict:
            raise MalformedEvent(f"not a JSON object: {_show(payload)}")
        if "error" in obj:
            error = obj["error"]
            self.error = error if isinstance(error, dict) else {"message": str(error)}
            self._pending = b""
            return False
        choices = obj.get("choices")
        if choices:
            try:
                for choice in choices:
                    index = choice.get("index", 0)
                    self._seen.add(index)
                    if choice.get("finish_reason") is not None:
                        self.finished.add(index)
            except (AttributeError, TypeError):  # not objects, an unhashable index
                raise MalformedEvent(f"choices are not objects: {_show(payload)}") from None
        usage = obj.get("usage")
        if usage and type(usage) is dict:
            self.usage = usage
        return True

    @property
    def complete(self) -> bool:
        """``[DONE]`` came, or every choice seen has a finish_reason."""
        return self.done or (bool(self.finished) and self._seen <= self.finished)

    def close(self) -> None:
        """The engine ended the stream: what is left must be nothing but blank lines."""
        if self._pending.strip():
            raise MalformedEvent(f"the stream ended inside an event: {_show(self._pending)}")


def _data_of(event: bytes) -> bytes | None:
    """The data of an event of several lines (None when it has none)."""
    parts = []
    for line in event.split(b"\n"):
        if line.startswith(b"data:"):
            parts.append(line[6:] if line[5:6] == b" " else line[5:])
        elif line and not line.startswith(_FIELDS):
            raise MalformedEvent(f"not an SSE field: {_show(line)}")
    return b"\n".join(parts) if parts else None


def _show(data: bytes) -> str:
    text = data.decode("utf-8", "replace")
    return repr(text if len(text) <= 120 else text[:120] + "...")
