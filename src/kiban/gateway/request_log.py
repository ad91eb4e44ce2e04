"""The request log: one JSON line per request, written without the logging machinery.

The logging module builds a LogRecord, takes a lock and writes once per line
(about 9% of the gateway's CPU per request on bench/gateways.py). Here a line
is the orjson encoding of the entry appended to a buffer, and the buffer goes
out in one write at the end of the event loop's current round (``call_soon``),
so a busy gateway writes many lines per system call and an idle one writes
each line a moment after its response.
"""

from __future__ import annotations

import asyncio
import os
import sys
from typing import TYPE_CHECKING, Any, BinaryIO

import orjson

if TYPE_CHECKING:
    from kiban.gateway.proxy import Exchange


class RequestLog:
    """Buffered JSON lines to a binary stream (stderr by default)."""

    def __init__(self, stream: BinaryIO | None = None) -> None:
        self.stream = stream if stream is not None else sys.stderr.buffer
        self._buffer = bytearray()
        self._scheduled = False

    def write(self, entry: dict[str, Any], loop: asyncio.AbstractEventLoop) -> None:
        """Queue one line; it is written when the loop finishes what it is doing."""
        self._buffer += orjson.dumps(entry, option=orjson.OPT_APPEND_NEWLINE)
        if not self._scheduled:
            self._scheduled = True
            loop.call_soon(self.flush)

    def flush(self) -> None:
        """Write what is buffered now (also at shutdown)."""
        self._scheduled = False
        if not self._buffer:
            return
        data, self._buffer = memoryview(bytes(self._buffer)), bytearray()
        try:
            fd = self.stream.fileno()
            while data:
                data = data[os.write(fd, data) :]
        except (OSError, ValueError):  # a closed or unwritable stream must not fail requests
            pass


def request_entry(ex: Exchange, route: str, worker: int, elapsed: float) -> dict[str, Any]:
    """The request log's line for one finished exchange."""
    usage = ex.usage or {}
    entry = {
        "request_id": ex.request_id,
        "worker": worker,
        "route": route,
        "engine": ex.engine,
        "endpoint": ex.endpoint,
        "stream": ex.stream,
        "status": ex.status,
        "attempts": ex.attempts,
        "retries": ex.retries,
        "latency_ms": round(elapsed * 1000, 2),
        "ttft_ms": None if ex.ttft_s is None else round(ex.ttft_s * 1000, 2),
        "prompt_tokens": usage.get("prompt_tokens"),
        "completion_tokens": usage.get("completion_tokens"),
        "error": ex.error,
    }
    if ex.structured is not None:
        entry["structured"] = ex.error or ex.structured.how
    if ex.continuations is not None:
        entry["continuations"] = ex.continuations
    return entry
