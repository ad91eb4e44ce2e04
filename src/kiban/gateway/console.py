"""The operator's console at ``/console`` and the admin endpoints behind it.

``/console`` and its static files (HTML, JS, the vendored uPlot) carry no
data and are served to anyone; everything with data needs an admin key
(``kiban keys add NAME --admin``) as ``Authorization: Bearer``:

- ``/admin/state``: one JSON document of engines, GPUs, routes, keys,
  recent errors, the plan and the chart series (:mod:`kiban.gateway.console_state`);
- ``/admin/metrics``: the private Prometheus series (usage per key name),
  which the public ``/metrics`` leaves out.

A client key gets 403, no key or an unknown one 401, both in OpenAI's error format.
"""

from __future__ import annotations

import asyncio
from importlib import resources
from typing import TYPE_CHECKING

import orjson

from kiban import api_errors as errors
from kiban.gateway.asgi import Scope, Send, send_response
from kiban.gateway.metrics import Metrics

if TYPE_CHECKING:
    from kiban.gateway.app import Gateway
    from kiban.gateway.auth import Grant

PREFIXES = ("/console", "/admin/")
_STATIC = "console_static"
_TYPES = {
    ".html": b"text/html; charset=utf-8",
    ".js": b"text/javascript; charset=utf-8",
    ".css": b"text/css; charset=utf-8",
    ".txt": b"text/plain; charset=utf-8",
}
_JSON = [(b"content-type", b"application/json")]
_PRIVATE = [(b"cache-control", b"no-store")]


def _assets() -> dict[str, tuple[bytes, bytes]]:
    """Every file of console_static/ by URL path, read once."""
    found = {}
    for item in resources.files("kiban.gateway").joinpath(_STATIC).iterdir():
        suffix = "." + item.name.rsplit(".", 1)[-1]
        if item.is_file() and suffix in _TYPES:
            found[f"/console/{item.name}"] = (item.read_bytes(), _TYPES[suffix])
    found["/console"] = found["/console/"] = found["/console/index.html"]
    return found


class Console:
    """Answers ``/console*`` and ``/admin/*`` for one gateway."""

    def __init__(self, gateway: Gateway) -> None:
        from kiban.gateway.console_state import ConsoleState

        self.gateway = gateway
        self.assets = _assets()
        self.state = ConsoleState(gateway)

    async def handle(self, scope: Scope, send: Send, path: str, request_id: str) -> None:
        rid = [(b"x-request-id", request_id.encode())]
        asset = self.assets.get(path)
        if asset is not None:
            body, content_type = asset
            await send_response(send, 200, body, [(b"content-type", content_type), *rid])
            return
        if path == "/admin/state":
            self._admin(scope)
            body = orjson.dumps(await self.state.document())
            await send_response(send, 200, body, _JSON + _PRIVATE + rid)
        elif path == "/admin/metrics":
            self._admin(scope)
            body = await asyncio.to_thread(self.gateway.metrics.render, "private")
            headers = [(b"content-type", Metrics.content_type.encode()), *_PRIVATE, *rid]
            await send_response(send, 200, body, headers)
        else:
            raise errors.unknown_path(path)

    def _admin(self, scope: Scope) -> Grant:
        """The admin grant of the request; 401 without a valid key, 403 for a client key."""
        authorization = None
        for name, value in scope["headers"]:
            if name == b"authorization":
                authorization = value
        live = self.gateway.live
        grant = live.keys.grant_for(authorization) if live.keys.enabled else None
        if grant is None:
            self.gateway.metrics.auth_rejections.inc()
            raise errors.admin_key_missing()
        if not grant.admin:
            raise errors.admin_key_required(grant.name)
        return grant
