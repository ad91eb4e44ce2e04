"""Usage of streams whose client did not ask for it.

OpenAI-compatible engines report a stream's token counts only when the
request sets ``stream_options.include_usage``: then one extra event, with
``"choices": []`` and the ``usage`` object, comes before ``[DONE]``. For
usage per key kiban asks for it on every stream (:func:`ask_for_usage`) and,
when the client had not, drops that one event on its way back, after reading
it (every event is parsed on its way: :class:`kiban.gateway.sse.EventStream`,
``drop_usage``). Everything else passes as the same bytes.
"""

from __future__ import annotations

from typing import Any

import orjson

_INCLUDE_USAGE = b'"stream_options":{"include_usage":true},'


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
