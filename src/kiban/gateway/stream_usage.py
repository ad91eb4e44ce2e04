"""Usage of streams whose client did not ask for it.

OpenAI-compatible engines report a stream's token counts only when the
request sets ``stream_options.include_usage``: then one extra event, with
``"choices": []`` and the ``usage`` object, comes before ``[DONE]``. For
usage per key kiban asks for it on every stream (:func:`ask_for_usage`) and,
when the client had not, drops that one event on its way back
(:class:`UsageEventDropper`); the gateway still reads it (the proxy keeps
the stream's raw tail). Everything else passes as the same bytes.
"""

from __future__ import annotations

import re
from typing import Any

import orjson

_INCLUDE_USAGE = b'"stream_options":{"include_usage":true},'
_USAGE_OBJECT = re.compile(rb'"usage"\s*:\s*\{')


def ask_for_usage(payload: dict[str, Any], body: bytes) -> tuple[bytes, bool]:
    """The body to send for a stream, and whether kiban added ``include_usage`` to it.

    Without ``stream_options`` the option is spliced in after the body's first
    ``{`` (no re-serialisation); with other stream options the body is dumped
    again; an invalid ``stream_options`` is left for the engine to refuse.
    *payload* is updated too (the structured-output and model-rename paths
    serialise it).
    """
    options = payload.get("stream_options")
    if options is None:
        if "stream_options" in payload:  # an explicit null
            payload["stream_options"] = {"include_usage": True}
            return orjson.dumps(payload), True
        payload["stream_options"] = {"include_usage": True}
        at = body.index(b"{") + 1
        return body[:at] + _INCLUDE_USAGE + body[at:], True
    if not isinstance(options, dict) or options.get("include_usage") is True:
        return body, False
    payload["stream_options"] = {**options, "include_usage": True}
    return orjson.dumps(payload), True


class UsageEventDropper:
    """Drops the usage-only events of an SSE stream, passing everything else unchanged.

    An event split across reads is held until it is whole (engines write
    whole events, so in practice nothing is held); :meth:`rest` returns what
    is left at the end.
    """

    __slots__ = ("_partial",)

    def __init__(self) -> None:
        self._partial = b""

    def feed(self, chunk: bytes) -> bytes:
        if self._partial:
            chunk, self._partial = self._partial + chunk, b""
        if not chunk.endswith(b"\n\n"):
            last = chunk.rfind(b"\n\n")
            end = last + 2 if last >= 0 else 0
            chunk, self._partial = chunk[:end], chunk[end:]
        if b'"usage"' not in chunk or not _USAGE_OBJECT.search(chunk):
            return chunk
        kept = [event for event in chunk.split(b"\n\n") if not _usage_only(event)]
        return b"\n\n".join(kept)

    def rest(self) -> bytes:
        rest, self._partial = self._partial, b""
        return rest


def _usage_only(event: bytes) -> bool:
    """Whether an SSE event is the extra usage event (no choices, a usage object)."""
    data = event.strip()
    if not data.startswith(b"data:") or not _USAGE_OBJECT.search(data):
        return False
    try:
        parsed = orjson.loads(data[5:])
    except orjson.JSONDecodeError:
        return False
    return (
        isinstance(parsed, dict)
        and parsed.get("choices") == []
        and isinstance(parsed.get("usage"), dict)
    )
