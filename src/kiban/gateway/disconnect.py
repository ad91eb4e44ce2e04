"""A client that goes away mid-request: cancel the work, or end a stream already under way."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable
from typing import Any

from kiban.api_errors import error_event
from kiban.gateway.asgi import Receive, Scope, Send
from kiban.gateway.server_protocol import DISCONNECT_HOOK


async def run_until_disconnect(scope: Scope, receive: Receive, work: Awaitable[Any]) -> bool:
    """Run *work*; if the client disconnects first, cancel it (closing the engine request).

    Returns False when the client went away, True when *work* finished. Under
    kiban's own protocol (:mod:`kiban.gateway.server_protocol`) the protocol calls back on
    disconnect; under another ASGI server a task watches ``receive()``.
    """
    if DISCONNECT_HOOK in scope:
        task = asyncio.current_task()
        assert task is not None
        gone = False

        def on_disconnect() -> None:
            nonlocal gone
            gone = True
            task.cancel()

        scope[DISCONNECT_HOOK] = on_disconnect
        try:
            await work
        except asyncio.CancelledError:
            if gone:
                task.uncancel()
                return False
            raise
        finally:
            scope[DISCONNECT_HOOK] = None
        return True
    return await _watch_receive(receive, work)


async def _watch_receive(receive: Receive, work: Awaitable[Any]) -> bool:
    task = asyncio.ensure_future(work)
    gone = False

    async def watch() -> None:
        nonlocal gone
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                if not task.done():
                    gone = True
                    task.cancel()
                return

    watcher = asyncio.ensure_future(watch())
    try:
        await task
    except asyncio.CancelledError:
        if gone:
            return False
        raise
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
    return True


async def end_stream(send: Send, message: str, code: str) -> None:
    """End a stream already under way with an error event (if the client is still there)."""
    with contextlib.suppress(Exception):
        event = error_event(message, "server_error", code)
        await send({"type": "http.response.body", "body": event, "more_body": False})
