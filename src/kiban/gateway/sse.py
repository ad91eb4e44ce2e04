"""Checking an engine's server-sent events before any of them reaches the client.

:class:`EventStream` takes the engine's bytes as they come and returns the
complete events among them, byte for byte as the engine sent them (an event is
re-serialised only when kiban takes something it asked for off it). Every event is
parsed first: its ``data`` must be a JSON
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
    """The state of one relayed stream; feed it the engine's bytes.

    *count*: ``(key, name)`` of the engine's per-event token count
    (:class:`kiban.engines.dialect.TokenCount`): ``generated`` follows it, and with
    *strip* it is taken off each event with choices (kiban asked for it, not the
    client). *drop_usage*: the usage-only event (``"choices": []``) is dropped (the
    client did not ask for usage). *keep*: the parsed objects are kept in ``objects``
    for a caller that rewrites the events. An event is re-serialised only when
    something is taken off it; the rest pass as the engine's bytes.
    """

    __slots__ = (
        "_count",
        "_drop_usage",
        "_pending",
        "_seen",
        "_strip",
        "done",
        "error",
        "events",
        "finished",
        "generated",
        "objects",
        "usage",
    )

    def __init__(
        self,
        *,
        count: tuple[str, str] | None = None,
        strip: bool = False,
        drop_usage: bool = False,
        keep: bool = False,
    ) -> None:
        self._pending = b""
        self._seen: set[int] = set()  # choice indexes seen
        self._count = count
        self._strip = strip and count is not None
        self._drop_usage = drop_usage
        self.finished: set[int] = set()  # choice indexes with a finish_reason
        self.done = False
        self.usage: dict[str, Any] | None = None  # the last usage seen
        self.generated: int | None = None  # the engine's last per-event token count
        self.error: dict[str, Any] | None = None  # an error event from the engine
        self.events = 0  # complete events taken
        self.objects: list[dict[str, Any]] | None = [] if keep else None

    def feed(self, data: bytes) -> bytes:
        """The complete events that end in ``pending + data``, checked; keeps the rest.

        Stops before an error event (it is not returned; ``error`` holds it).
        Raises :class:`MalformedEvent` for an event that does not parse; what the
        events before it in *data* told (usage, count) is then forgotten, as they
        are not returned.
        """
        if not self._pending and data[:6] == b"data: " and data.find(b"\n") == len(data) - 2:
            if data[-1:] != b"\n":  # one data line and a blank line: the usual read
                self._pending = data
                return b""
            taken = self._take(data[6:-2])
            return data if taken is True else taken or b""
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
        usage, generated = self.usage, self.generated
        parts: list[bytes] | None = None  # set once an event is not passed as it came
        try:
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
                    kept: bool | bytes = True
                else:
                    kept = self._take(payload)
                if kept is True:
                    if parts is not None:
                        parts.append(event + b"\n\n")
                    continue
                if parts is None:
                    parts = [e + b"\n\n" for e in events[:n] if e]
                if kept is False:
                    return b"".join(parts)
                parts.append(kept)
        except MalformedEvent:
            self.usage, self.generated = usage, generated
            raise
        return data[: end + 2] if parts is None else b"".join(parts)

    def _take(self, payload: bytes) -> bool | bytes:
        """Check the data of one event: True to pass it as it came, the bytes to send
        instead, or False for an error (nothing more is taken)."""
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
        if self.objects is not None:
            self.objects.append(obj)
        choices = obj.get("choices")
        usage = obj.get("usage")
        if usage and type(usage) is dict:
            self.usage = usage
        if choices:
            try:
                for choice in choices:
                    index = choice.get("index", 0)
                    self._seen.add(index)
                    if choice.get("finish_reason") is not None:
                        self.finished.add(index)
            except (AttributeError, TypeError):  # not objects, an unhashable index
                raise MalformedEvent(f"choices are not objects: {_show(payload)}") from None
            if self._count is not None:
                key, name = self._count
                counted = obj.get(key)
                if type(counted) is dict:
                    n = counted.get(name)
                    if type(n) is int:
                        self.generated = n
                    if self._strip:
                        del obj[key]  # dumped again: faster than cutting the bytes in Python
                        return b"data: " + orjson.dumps(obj) + b"\n\n"
        elif self._drop_usage and choices == [] and type(usage) is dict:
            return b""
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
