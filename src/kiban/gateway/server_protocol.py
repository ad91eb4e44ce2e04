"""uvicorn's httptools protocol with the limits a public server needs (``gateway.http``).

uvicorn (0.54, httptools) limits neither the number nor the size of request
headers, and sets no timeout before a request is complete: a client that
connects and sends nothing, or trickles its headers or body (slowloris),
holds a connection and a task forever. This protocol adds:

* ``max_headers`` / ``max_header_bytes``: past either, 431 and the
  connection closes;
* ``header_timeout_s`` (connection or first byte of a request to the end of
  its headers) and ``body_timeout_s`` (end of headers to end of body): past
  either, 408 and the connection closes;
* OpenAI-shaped JSON for the errors uvicorn would answer in plain text;
* a disconnect hook (``scope["kiban.on_disconnect"]``): the app learns that its
  client went away without a task per request waiting on ``receive()``.

The timeouts cost no timer per request: each connection records a deadline
(one float), and one sweep per server, a few times a second, closes the
connections past theirs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import MutableMapping
from typing import Any, cast

import httptools
import uvicorn
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from kiban.api_errors import error_body
from kiban.config import ClientLimits

log = logging.getLogger("kiban.http")

_SWEEP_MAX_S = 1.0
#: scope key where the app may put a callback run when the client goes away mid-request
DISCONNECT_HOOK = "kiban.on_disconnect"


class _HeadersTooLarge(Exception):
    pass


def _scope_dict(scope: object) -> MutableMapping[str, Any]:
    """A request's scope as the plain dict it is, for kiban's own key (uvicorn types the
    scope as a TypedDict of the ASGI keys only)."""
    return cast(MutableMapping[str, Any], scope)


class KibanUvicornConfig(uvicorn.Config):
    """uvicorn's Config carrying kiban's client limits to the protocol."""

    def __init__(self, *args: Any, client_limits: ClientLimits, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.client_limits = client_limits


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """HttpToolsProtocol with header limits, header and body timeouts, JSON errors."""

    def __init__(self, config: uvicorn.Config, *args: Any, **kwargs: Any) -> None:
        super().__init__(config, *args, **kwargs)
        limits = getattr(config, "client_limits", None) or ClientLimits()
        self._max_headers = limits.max_headers
        self._max_header_bytes = limits.max_header_bytes
        self._header_timeout_s = limits.header_timeout_s
        self._body_timeout_s = limits.body_timeout_s
        self.deadline = 0.0  # when the client must have sent what it owes; 0: owes nothing
        self.phase = "headers"
        self._header_count = 0
        self._header_bytes = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # a stream protocol's transport is a full Transport (uvicorn's own signature says so)
        super().connection_made(cast(asyncio.Transport, transport))
        self.deadline = self.loop.time() + self._header_timeout_s
        self.phase = "headers"

    def data_received(self, data: bytes) -> None:
        self._unset_keepalive_if_required()
        if not self.deadline and (self.cycle is None or self.cycle.response_complete):
            self.deadline = self.loop.time() + self._header_timeout_s
            self.phase = "headers"
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self.reject(400, "protocol upgrades are not supported", "upgrade_not_supported")
        except httptools.HttpParserError as exc:
            if isinstance(exc.__context__, _HeadersTooLarge):
                self.reject(431, str(exc.__context__), "headers_too_large")
            else:
                self.reject(400, "invalid HTTP request", "invalid_http_request")

    def on_message_begin(self) -> None:
        super().on_message_begin()
        _scope_dict(self.scope)[DISCONNECT_HOOK] = None
        self._header_count = 0
        self._header_bytes = 0
        if not self.deadline:
            self.deadline = self.loop.time() + self._header_timeout_s
            self.phase = "headers"

    def on_url(self, url: bytes) -> None:
        self._count_header_bytes(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_count += 1
        if self._header_count > self._max_headers:
            raise _HeadersTooLarge(
                f"more than gateway.http.max_headers ({self._max_headers}) headers"
            )
        self._count_header_bytes(len(name) + len(value))
        super().on_header(name, value)

    def _count_header_bytes(self, size: int) -> None:
        self._header_bytes += size
        if self._header_bytes > self._max_header_bytes:
            raise _HeadersTooLarge(
                f"request line and headers exceed gateway.http.max_header_bytes "
                f"({self._max_header_bytes})"
            )

    def connection_lost(self, exc: Exception | None) -> None:
        cycle = self.cycle
        hook = None
        if cycle is not None and not cycle.response_complete:
            hook = _scope_dict(cycle.scope).get(DISCONNECT_HOOK)
        super().connection_lost(exc)
        if hook is not None:
            hook()  # the app cancels its work at once: no task watching receive() needed

    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        self.deadline = self.loop.time() + self._body_timeout_s
        self.phase = "body"

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self.deadline = 0.0

    def reject(self, status: int, message: str, code: str) -> None:
        """Answer *status* with an OpenAI error (unless a response has begun) and close."""
        if self.transport.is_closing():
            return
        if self.cycle is None or not self.cycle.response_started:
            if self.cycle is not None:
                self.cycle.response_started = self.cycle.response_complete = True
            kind = "timeout" if status == 408 else "invalid_request_error"
            body = error_body(message, kind, code=code)
            self.transport.write(
                b"".join(
                    [
                        STATUS_LINE[status],
                        b"content-type: application/json\r\n",
                        b"content-length: %d\r\n" % len(body),
                        b"connection: close\r\n\r\n",
                        body,
                    ]
                )
            )
        self.transport.close()

    def expire(self) -> None:
        """The client did not send its headers or body in time."""
        if self.phase == "headers":
            limit, name = self._header_timeout_s, "header_timeout_s"
        else:
            limit, name = self._body_timeout_s, "body_timeout_s"
        self.deadline = 0.0
        self.reject(
            408,
            f"the request's {self.phase} did not arrive within gateway.http.{name} ({limit:g} s)",
            "request_timeout",
        )


class KibanServer(uvicorn.Server):
    """uvicorn's Server plus the sweep that enforces the protocol's deadlines."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self._sweeper: asyncio.Task[None] | None = None

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        limits = getattr(self.config, "client_limits", None) or ClientLimits()
        every = min(_SWEEP_MAX_S, limits.header_timeout_s / 4, limits.body_timeout_s / 4)
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep(max(0.05, every)))

    async def _sweep(self, every: float) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(every)
            now = loop.time()
            for connection in list(self.server_state.connections):
                if not isinstance(connection, GuardedHttpToolsProtocol):
                    continue
                deadline = connection.deadline
                if deadline and deadline < now:
                    with contextlib.suppress(Exception):
                        connection.expire()

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        try:
            await super().shutdown(sockets)  # the sweep goes on while requests drain
        finally:
            if self._sweeper is not None:
                self._sweeper.cancel()
