"""The GET endpoints: health, readiness, metrics, the model list and the OpenAPI document."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import orjson

from kiban.gateway.admission import authorize, models_allowed
from kiban.gateway.asgi import Scope, Send, send_response
from kiban.gateway.metrics import Metrics

if TYPE_CHECKING:
    from kiban.gateway.app import Gateway

PATHS = ("/health", "/ready", "/metrics", "/v1/models", "/openapi.json")
JSON = [(b"content-type", b"application/json")]


async def answer_get(gateway: Gateway, scope: Scope, send: Send, path: str, rid: str) -> None:
    """Answer GET (or HEAD) *path*, one of :data:`PATHS`."""
    headers = [*JSON, (b"x-request-id", rid.encode())]
    live = gateway.live
    if path == "/health":
        await send_response(send, 200, b'{"status":"ok"}', headers)
    elif path == "/ready":
        missing = [r.name for r in live.router.routes if not r.has_healthy_target()]
        status = 503 if missing else 200
        body = orjson.dumps({"ready": not missing, "routes_without_healthy_engine": missing})
        await send_response(send, status, body, headers)
    elif path == "/metrics":
        # off the event loop: NVML readings (PCIe throughput samples for 20 ms per
        # GPU) took 57 ms a scrape on the H100, which would stall every stream
        body = await asyncio.to_thread(gateway.metrics.render)
        await send_response(send, 200, body, [(b"content-type", Metrics.content_type.encode())])
    elif path == "/openapi.json":
        await send_response(send, 200, live.openapi, headers)
    else:
        authorization = next((v for n, v in scope["headers"] if n == b"authorization"), None)
        grant = authorize(live, gateway.metrics, authorization)
        data = [
            {"id": name, "object": "model", "created": gateway.created, "owned_by": "kiban"}
            for name in models_allowed(live, grant)
        ]
        await send_response(send, 200, orjson.dumps({"object": "list", "data": data}), headers)
