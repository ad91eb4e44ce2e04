"""HTTP/1.1 to the engines: keep-alive connection pools on asyncio protocols, httptools parsing.

Why not aiohttp's client: on this project's benchmark (bench/gateways.py,
docs/benchmarks.md) aiohttp's client took 35% of the gateway's CPU per request
and held the first bytes of a dense stream back by several milliseconds; an
asyncio protocol with httptools (the parser uvicorn uses) costs a fraction of
that, hands every chunk over as it arrives, and is all the gateway needs: one
POST or GET at a time per connection, to a handful of known engines.

A :class:`Pool` per engine keeps idle connections. :meth:`Pool.request` sends a
request and returns an :class:`EngineConnection` once the response headers have come;
the body is then read whole (:meth:`EngineConnection.read`) or chunk by chunk as the
engine sends it (:meth:`EngineConnection.next_chunk`, with back-pressure: reading from
the engine pauses while the client lags). Deadlines are loop timers, not
``asyncio.timeout`` blocks, so a request costs no extra task or context.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from typing import cast
from urllib.parse import urlsplit

import httptools

from kiban.errors import KibanError

_MAX_IDLE = 64
#: a reused connection that closes without a byte of answer this soon after the request
#: was written was closed by the engine before the request could reach it (an idle
#: keep-alive connection timed out as it was taken): sent again, silently, on a new one.
#: Closed later, the engine may have had the request: that is a failed attempt.
STALE_WINDOW_S = 0.05


class EngineError(KibanError):
    """The engine could not be reached or broke the exchange."""


class ConnectFailed(EngineError):
    """No connection (refused, unreachable, name not found)."""


class ConnectTimeout(ConnectFailed, TimeoutError):
    """The engine did not accept the connection within the connect timeout."""


class Dropped(EngineError):
    """The connection ended before the response did."""


class BadResponse(EngineError):
    """The engine's bytes are not an HTTP/1.1 response."""


class Deadline(KibanError, TimeoutError):
    """A deadline of the caller's (first byte, total) passed; ``what`` names it."""

    def __init__(self, what: str) -> None:
        super().__init__(what)
        self.what = what


def describe(exc: BaseException) -> str:
    """An exception for a message: its class, and its text when it has one."""
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class _Stale(Exception):
    """A reused idle connection was closed by the engine at once, before any byte of the
    answer (within :data:`STALE_WINDOW_S` of the request)."""


class EngineConnection(asyncio.Protocol):
    """One connection to an engine, carrying one request at a time."""

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.loop = pool.loop
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.reusable = False
        self.used = 0
        self.sent_at = 0.0
        self._clear()

    def _clear(self) -> None:
        self.status = 0
        self.content_type: bytes | None = None
        self.retry_after: bytes | None = None
        self.complete = False
        self._framed = False
        self._headers_done = False
        self._got_bytes = False
        self._chunks: deque[bytes] = deque()
        self._streaming = False  # the reader takes chunks one by one (next_chunk)
        self._paused = False
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._idle_s = 0.0
        self._last_data = 0.0

    # -- the request ------------------------------------------------------------------------

    def _send(self, head: bytes, body: bytes) -> None:
        assert self.transport is not None
        self._clear()
        self.used += 1
        self.reusable = False
        self.sent_at = self.loop.time()
        self.transport.write(head + body if len(body) < 16384 else head)
        if len(body) >= 16384:
            self.transport.write(body)

    def expire_at(self, when: float, what: str) -> None:
        """Abort the exchange with :class:`Deadline` *what* if it is not done at *when*."""
        self._timers[what] = self.loop.call_at(when, self._expire, what)

    def cancel_deadline(self, what: str) -> None:
        """Drop the deadline named *what* (e.g. ``first byte`` once it came)."""
        timer = self._timers.pop(what, None)
        if timer is not None:
            timer.cancel()

    def watch_idle(self, idle_s: float) -> None:
        """Abort with :class:`Deadline` ``idle`` when the engine sends nothing for *idle_s*.

        One timer per *idle_s* of streaming, not one per chunk: data only records
        when it came, and the timer, when it fires early, waits out the rest.
        Time spent paused for a slow client does not count as the engine's silence.
        """
        self._idle_s = idle_s
        self._last_data = self.loop.time()
        self._timers["idle"] = self.loop.call_at(self._last_data + idle_s, self._idle_check)

    def _idle_check(self) -> None:
        now = self.loop.time()
        if self._paused:
            self._last_data = now
        if not self.complete and now - self._last_data >= self._idle_s - 1e-3:
            self._expire("idle")
        elif not self.complete:
            self._timers["idle"] = self.loop.call_at(
                self._last_data + self._idle_s, self._idle_check
            )

    def _expire(self, what: str) -> None:
        if not self.complete:
            self._fail(Deadline(what))
            self.abort()

    async def _wait(self) -> None:
        if self._error is not None:
            raise self._error
        self._waiter = self.loop.create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _fail(self, error: BaseException) -> None:
        if self._error is None:
            self._error = error
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(error)

    # -- reading the response -----------------------------------------------------------------

    async def next_chunk(self) -> bytes:
        """The next piece of the body as the engine sent it; ``b""`` at its end.

        While a piece waits to be taken, reading from the engine pauses: the
        reader relays each read before the next one happens, so the first
        tokens go out at once even when the engine sends faster than the
        client takes (and a slow client slows the engine's connection, not
        kiban's memory).
        """
        self._streaming = True
        while not self._chunks:
            if self._paused and self.transport is not None:
                self._paused = False
                self.transport.resume_reading()
            if self.complete:
                return b""
            if self._error is not None:
                raise self._error
            await self._wait()
        return self._chunks.popleft()

    async def read(self) -> bytes:
        """The whole body."""
        while not self.complete:
            if self._error is not None:
                raise self._error
            await self._wait()
        body = b"".join(self._chunks)
        self._chunks.clear()
        return body

    def finish(self) -> None:
        """Hand the connection back to its pool (kept if the response ended cleanly)."""
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        if self.complete and self.reusable and self._error is None and not self._chunks:
            self.pool._put_back(self)
        else:
            self.abort()

    def abort(self) -> None:
        """Close at once; an engine sees the request cancelled."""
        self.reusable = False
        if self.transport is not None:
            self.transport.abort()

    # -- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream connection's transport is a full Transport; asyncio types it as the base.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self._got_bytes = True
        if self._idle_s:
            self._last_data = self.loop.time()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as err:
            self._fail(BadResponse(f"invalid HTTP response: {err}"))
            self.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self.reusable = False
        self.pool._forget(self)
        if self.complete:
            return
        if self._headers_done and not self._framed:
            self.on_message_complete()  # a body that ends with the connection
        elif not self._got_bytes and self.used > 1:
            held = self.loop.time() - self.sent_at
            if held <= STALE_WINDOW_S:
                self._fail(_Stale())
            else:
                self._fail(
                    Dropped(
                        f"the engine closed a reused connection {held:.2f} s after the "
                        "request, without answering"
                    )
                )
        else:
            reason = f": {exc}" if exc else ""
            self._fail(Dropped(f"the engine closed the connection mid-response{reason}"))

    # -- httptools callbacks ------------------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        length = len(name)
        if length == 12 and name.lower() == b"content-type":
            self.content_type = value
        elif length == 11 and name.lower() == b"retry-after":
            self.retry_after = value
        elif length in (14, 17) and name.lower() in (b"content-length", b"transfer-encoding"):
            self._framed = True

    def on_headers_complete(self) -> None:
        self._headers_done = True
        self.status = self.parser.get_status_code()
        self._wake()

    def on_body(self, body: bytes) -> None:
        self._chunks.append(body)
        if self._streaming and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        self.complete = True
        self.reusable = self.parser.should_keep_alive()
        self._wake()


class Pool:
    """Keep-alive connections to one engine (``scheme://host:port``)."""

    def __init__(self, base_url: str, loop: asyncio.AbstractEventLoop) -> None:
        parts = urlsplit(base_url)
        self.loop = loop
        self.host = parts.hostname or "127.0.0.1"
        self.tls = ssl.create_default_context() if parts.scheme == "https" else None
        default_port = 443 if self.tls else 80
        self.port = parts.port or default_port
        authority = self.host if self.port == default_port else f"{self.host}:{self.port}"
        self.host_header = b"host: " + authority.encode("idna") + b"\r\n"
        self.prefix = parts.path.rstrip("/").encode()
        self._idle: list[EngineConnection] = []
        self._open: set[EngineConnection] = set()
        self._retired = False  # its engine left the configuration: keep no connection idle

    async def request(
        self,
        method: bytes,
        path: bytes,
        headers: bytes,
        body: bytes,
        *,
        connect_timeout: float,
        first_byte_at: float | None = None,
        total_at: float | None = None,
    ) -> EngineConnection:
        """Send one request; return once its response headers have arrived.

        *headers* are complete header lines (each ending in CRLF) besides Host and
        Content-Length. Raises :class:`ConnectFailed`, :class:`Dropped`,
        :class:`BadResponse` or :class:`Deadline`; on any of them the connection is
        already closed.
        """
        head = b"".join((
            method, b" ", self.prefix, path, b" HTTP/1.1\r\n", self.host_header, headers,
            b"content-length: ", str(len(body)).encode(), b"\r\n\r\n",
        ))  # fmt: skip
        for _ in range(2):
            conn = self._idle.pop() if self._idle else await self._connect(connect_timeout)
            conn._send(head, body)
            # one timer until the headers: the earlier deadline (the total one only starts
            # ticking after them if the body is still to come: one timer a request, mostly)
            if first_byte_at is not None and (total_at is None or first_byte_at < total_at):
                conn.expire_at(first_byte_at, "first byte")
            elif total_at is not None:
                conn.expire_at(total_at, "total")
                total_at = None
            try:
                while not conn._headers_done:
                    await conn._wait()
                if total_at is not None and not conn.complete:
                    conn.expire_at(total_at, "total")
            except _Stale:
                conn.finish()
                continue  # the engine had closed this idle connection: once more, on a new one
            except BaseException:
                conn.finish()
                raise
            return conn
        raise Dropped("the engine closed two connections in a row before answering")

    async def _connect(self, timeout: float) -> EngineConnection:
        connecting = self.loop.create_connection(
            lambda: EngineConnection(self),
            self.host,
            self.port,
            ssl=self.tls,
            server_hostname=self.host if self.tls else None,
        )
        try:
            _, conn = await asyncio.wait_for(connecting, timeout)
        except TimeoutError:
            raise ConnectTimeout(
                f"no connection within the connect timeout ({timeout:g} s)"
            ) from None
        except OSError as err:
            raise ConnectFailed(err.strerror or str(err)) from None
        self._open.add(conn)
        return conn

    def _put_back(self, conn: EngineConnection) -> None:
        transport = conn.transport
        if (
            not self._retired
            and len(self._idle) < _MAX_IDLE
            and transport
            and not transport.is_closing()
        ):
            self._idle.append(conn)
        else:
            conn.abort()

    def _forget(self, conn: EngineConnection) -> None:
        self._open.discard(conn)
        if conn in self._idle:
            self._idle.remove(conn)

    def close_idle(self) -> None:
        """Close the idle connections (an engine removed by a reload; busy ones finish and
        close then)."""
        self._retired = True
        for conn in list(self._idle):
            conn.abort()
        self._idle.clear()

    def close(self) -> None:
        """Close every connection (idle or busy)."""
        for conn in list(self._open):
            conn.abort()
        self._idle.clear()
