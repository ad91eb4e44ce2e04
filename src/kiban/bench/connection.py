"""One keep-alive HTTP/1.1 client connection: an asyncio protocol, httptools parsing.

A connection runs one request at a time. The request is given as complete
bytes (built once per run by :class:`kiban.bench.workload.Workload`), and
the outcome is left on the connection: status, timings, the SSE counters of
a stream, or the kind of error. Nothing is allocated per response beyond
what the parser hands over.
"""

from __future__ import annotations

import asyncio
import ssl
from time import perf_counter
from typing import cast

import httptools

from kiban.bench.sse import StreamTimer, body_usage
from kiban.errors import KibanError

#: error kinds a request can end with besides an HTTP status (``http_NNN``)
CONNECT, TIMEOUT, DISCONNECTED, PROTOCOL = "connect", "timeout", "disconnected", "protocol"
STREAM_ERROR, INCOMPLETE_STREAM = "stream_error", "incomplete_stream"
_ERROR_SAMPLE_BYTES = 300
_DESCRIPTIONS = {
    TIMEOUT: b"no complete answer within the request timeout",
    DISCONNECTED: b"the server closed the connection before the answer ended",
    INCOMPLETE_STREAM: b"the stream ended without data: [DONE]",
}


class StaleConnection(KibanError):
    """A reused connection was closed by the server before any byte of the answer."""


class Connection(asyncio.Protocol):
    """A client connection; ``await request(raw, stream)`` sends one request."""

    def __init__(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.timer = StreamTimer()
        self.usable = False  # connected and may carry another request
        self.requests = 0
        self._waiter: asyncio.Future[None] | None = None
        self._timeout: asyncio.TimerHandle | None = None
        self._stream = False
        self._now = 0.0
        self._reset_response()

    @classmethod
    async def open(
        cls, host: str, port: int, tls: ssl.SSLContext | None, timeout_s: float
    ) -> Connection:
        """Connect; raises OSError or TimeoutError."""
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(timeout_s):
            _, conn = await loop.create_connection(
                cls, host, port, ssl=tls, server_hostname=host if tls else None
            )
        return conn

    def _reset_response(self) -> None:
        self.status = 0
        self.error: str | None = None
        self.error_sample = b""
        self.first_byte = 0.0  # when the response headers arrived
        self.finished = 0.0
        self.body: list[bytes] = []
        self.framed = False  # Content-Length or chunked: the end is known without EOF
        self._headers_done = False
        self._complete = False

    # -- the request -------------------------------------------------------------------------

    async def request(self, raw: bytes, stream: bool, timeout_s: float) -> None:
        """Send *raw*, wait for the whole response. Sets ``error`` instead of raising,
        except :class:`StaleConnection` (the caller retries on a new connection)."""
        assert self.transport is not None and self._waiter is None
        self._reset_response()
        if stream:
            self.timer.reset()
        self._stream = stream
        loop = asyncio.get_running_loop()
        waiter = self._waiter = loop.create_future()
        self._timeout = loop.call_later(timeout_s, self._on_timeout)
        reused = self.requests > 0
        self.requests += 1
        self.transport.write(raw)
        try:
            await waiter
        except StaleConnection:
            if reused:
                raise
            self.error, self.error_sample = DISCONNECTED, _DESCRIPTIONS[DISCONNECTED]
        finally:
            self._waiter = None
            self._timeout.cancel()
        if self.error is None and stream and self.status == 200:
            if self.timer.error_event is not None:
                self.error = STREAM_ERROR
                self.error_sample = self.timer.error_event[:_ERROR_SAMPLE_BYTES]
            elif not self.timer.done:
                self.error, self.error_sample = INCOMPLETE_STREAM, _DESCRIPTIONS[INCOMPLETE_STREAM]

    def usage(self) -> tuple[int | None, int | None]:
        """``(prompt_tokens, completion_tokens)`` of the last response, if it gave them."""
        if self._stream and self.status == 200:
            return self.timer.prompt_tokens, self.timer.completion_tokens
        return body_usage(b"".join(self.body))

    def close(self) -> None:
        self.usable = False
        if self.transport is not None:
            self.transport.close()

    def _finish(self, error: str | None = None) -> None:
        self.finished = perf_counter()
        if error is not None and self.error is None:
            self.error = error
            self.error_sample = self.error_sample or _DESCRIPTIONS.get(error, b"")
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _on_timeout(self) -> None:
        self._finish(TIMEOUT)
        self.usable = False
        if self.transport is not None:
            self.transport.abort()

    # -- asyncio.Protocol --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream connection's transport is a full Transport; asyncio types it as the base.
        self.transport = cast(asyncio.Transport, transport)
        self.usable = True

    def data_received(self, data: bytes) -> None:
        self._now = perf_counter()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.error_sample = data[:_ERROR_SAMPLE_BYTES]
            self._finish(PROTOCOL)
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.usable = False
        waiter = self._waiter
        if waiter is None or waiter.done():
            return
        if not self._headers_done and self.first_byte == 0.0:
            waiter.set_exception(StaleConnection())
        elif self._headers_done and not self.framed:
            self._finish()  # a body delimited by the end of the connection
        else:
            self._finish(DISCONNECTED)

    # -- httptools callbacks -----------------------------------------------------------------

    def on_message_begin(self) -> None:
        self.first_byte = self._now

    def on_header(self, name: bytes, _value: bytes) -> None:
        if len(name) in (14, 17):
            lowered = name.lower()
            if lowered in (b"content-length", b"transfer-encoding"):
                self.framed = True

    def on_headers_complete(self) -> None:
        self._headers_done = True
        self.status = self.parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        if self._stream and self.status == 200:
            self.timer.feed(body, self._now)
        else:
            self.body.append(body)

    def on_message_complete(self) -> None:
        if not self.parser.should_keep_alive():
            self.close()
        if self.status >= 400 or self.status < 200:
            self.error_sample = b"".join(self.body)[:_ERROR_SAMPLE_BYTES]
            self._finish(f"http_{self.status}")
        else:
            self._finish()
