"""The gateway as a plain ASGI application.

No web framework sits on the hot path: the routes are a handful of exact
paths, and a request body is parsed once (orjson) for what routing needs and
forwarded as the same bytes unless the engine knows the model by another name.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import time
from typing import Any

import orjson

from kiban.config import KibanConfig
from kiban.deploy.state import RUN_STATE_ENV, gpu_verdicts
from kiban.gateway.asgi import ClientDisconnected, Receive, Scope, Send, read_body, send_response
from kiban.gateway.auth import KeyChecker, load_key_digests
from kiban.gateway.errors import APIError
from kiban.gateway.health import HealthChecker
from kiban.gateway.metrics import Metrics
from kiban.gateway.proxy import Exchange, Proxy
from kiban.gateway.routing import Router
from kiban.structured.constraint import STRUCTURED_KEYS
from kiban.structured.request import StructuredService

access_log = logging.getLogger("kiban.access")
log = logging.getLogger("kiban.gateway")

_INFERENCE = {
    "/v1/chat/completions": "chat",
    "/v1/completions": "completions",
    "/v1/embeddings": "embeddings",
}
_GET_ROUTES = ("/health", "/ready", "/metrics", "/v1/models")
_REQUEST_ID = re.compile(rb"^[A-Za-z0-9._:-]{1,128}$")
_JSON = [(b"content-type", b"application/json")]
_IMAGE_PARTS = frozenset({"image_url", "input_image", "image"})


def has_images(messages: Any) -> bool:
    """Whether any chat message carries an image part."""
    if not isinstance(messages, list):
        return False
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list):
            for part in content:
                if isinstance(part, dict) and part.get("type") in _IMAGE_PARTS:
                    return True
    return False


class Gateway:
    """ASGI callable: OpenAI-compatible endpoints in front of the configured engines."""

    def __init__(self, config: KibanConfig, key_digests: list[bytes] | None = None) -> None:
        self.config = config
        self.router = Router(config)
        self.metrics = Metrics()
        self.structured = StructuredService(config.routes)
        self.metrics.prepare(self.router.routes)
        digests = load_key_digests(config.gateway.api_keys) if key_digests is None else key_digests
        self.keys = KeyChecker(digests)
        self.proxy: Proxy | None = None
        self.health: HealthChecker | None = None
        self.created = int(time.time())
        self.log_requests = config.gateway.request_log
        self.worker_pid = os.getpid()

    # -- lifecycle ---------------------------------------------------------------------------

    async def startup(self) -> None:
        loop = asyncio.get_running_loop()
        for upstream in self.router.upstreams.values():
            upstream.connect(loop)
        self.proxy = Proxy(self.metrics, loop)
        gw = self.config.gateway
        self.health = HealthChecker(
            list(self.router.upstreams.values()),
            self.metrics,
            gw.health_interval_s,
            gw.health_timeout_s,
            on_checked=self._after_health_checks,
        )
        await self.health.check_all()
        self.health.start()

    def _after_health_checks(self) -> None:
        self.metrics.routes_health(self.router.routes)
        for engine, verified in gpu_verdicts(os.environ.get(RUN_STATE_ENV)).items():
            self.metrics.set_gpu_verified(engine, verified)

    async def shutdown(self) -> None:
        if self.health is not None:
            await self.health.stop()
        for upstream in self.router.upstreams.values():
            if upstream.http is not None:
                upstream.http.close()
        self.metrics.close()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await self._http(scope, receive, send)
        elif scope["type"] == "lifespan":
            await self._lifespan(receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self.startup()
                except Exception as exc:  # report, then let the server exit
                    log.exception("gateway failed to start")
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.shutdown()
                await send({"type": "lifespan.shutdown.complete"})
                return

    # -- HTTP --------------------------------------------------------------------------------

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        path, method = scope["path"], scope["method"]
        request_id = _request_id(scope)
        try:
            endpoint = _INFERENCE.get(path)
            if endpoint is not None:
                if method != "POST":
                    raise _method_not_allowed(method, path, "POST")
                self._authorize(scope)
                await self._inference(scope, receive, send, endpoint, request_id)
            elif path in _GET_ROUTES:
                if method not in ("GET", "HEAD"):
                    raise _method_not_allowed(method, path, "GET")
                await self._get(scope, send, path, request_id)
            else:
                raise APIError(404, f"unknown path {path!r}", code="unknown_path")
        except APIError as err:
            headers = [*_JSON, (b"x-request-id", request_id.encode()), *err.headers]
            await send_response(send, err.status, err.body(), headers)
        except ClientDisconnected:
            pass

    def _authorize(self, scope: Scope) -> None:
        if not self.keys.enabled:
            return
        authorization = None
        for name, value in scope["headers"]:
            if name == b"authorization":
                authorization = value
                break
        if not self.keys.check(authorization):
            self.metrics.auth_rejections.inc()
            raise APIError(
                401,
                "missing or invalid API key; send 'Authorization: Bearer <key>'",
                "authentication_error",
                code="invalid_api_key",
            )

    async def _get(self, scope: Scope, send: Send, path: str, request_id: str) -> None:
        rid = [(b"x-request-id", request_id.encode())]
        if path == "/health":
            await send_response(send, 200, b'{"status":"ok"}', _JSON + rid)
        elif path == "/ready":
            missing = [r.name for r in self.router.routes if not r.has_healthy_target()]
            status = 503 if missing else 200
            body = orjson.dumps({"ready": not missing, "routes_without_healthy_engine": missing})
            await send_response(send, status, body, _JSON + rid)
        elif path == "/metrics":
            # off the event loop: NVML readings (PCIe throughput samples for 20 ms per
            # GPU) took 57 ms a scrape on the H100, which would stall every stream
            body = await asyncio.to_thread(self.metrics.render)
            await send_response(send, 200, body, [(b"content-type", Metrics.content_type.encode())])
        else:
            self._authorize(scope)
            data = [
                {"id": name, "object": "model", "created": self.created, "owned_by": "kiban"}
                for name in self.router.public_models
            ]
            body = orjson.dumps({"object": "list", "data": data})
            await send_response(send, 200, body, _JSON + rid)

    async def _inference(
        self, scope: Scope, receive: Receive, send: Send, endpoint: str, request_id: str
    ) -> None:
        body = await read_body(scope, receive, self.config.gateway.max_body_bytes)
        payload = _parse_json(body)
        model = payload.get("model")
        if not isinstance(model, str) or not model:
            raise APIError(
                400, "'model' is required and must be a string", param="model", code="missing_model"
            )
        route = self.router.route_for(model)
        if route is None:
            available = ", ".join(self.router.public_models)
            raise APIError(
                404,
                f"model {model!r} does not exist; available models: {available}",
                param="model",
                code="model_not_found",
            )
        stream = payload.get("stream", False)
        if stream is not None and not isinstance(stream, bool):
            raise APIError(400, "'stream' must be a boolean", param="stream")
        needs_images = endpoint == "chat" and has_images(payload.get("messages"))
        structured = None
        if endpoint != "embeddings" and (
            route.name in self.structured.fixed or not STRUCTURED_KEYS.isdisjoint(payload)
        ):
            structured = self.structured.prepare(payload, route)
        ex = Exchange(
            request_id=request_id,
            endpoint=endpoint,
            body=body,
            payload=payload,
            model=model,
            stream=bool(stream),
            client_headers=scope["headers"],
            structured=structured,
        )
        in_flight = self.metrics.in_flight_for(route.name)
        in_flight.inc()
        try:
            work = self.proxy.handle(ex, route, send, needs_images)
            if not await _run_until_disconnect(receive, work):
                ex.status = ex.status or 499
                ex.error = "client_disconnected"
        except APIError as err:
            ex.status = err.status
            ex.error = err.code or err.type
            if err.code == "engines_saturated":
                self.metrics.rate_limited(route.name, "engine_concurrency")
            raise
        finally:
            in_flight.dec()
            self._record(ex, route.name)

    def _record(self, ex: Exchange, route: str) -> None:
        elapsed = time.perf_counter() - ex.started
        self.metrics.observe_exchange(route, ex, elapsed)
        usage = ex.usage or {}
        prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
        if self.log_requests:
            access_log.info(
                orjson.dumps(
                    {
                        "request_id": ex.request_id,
                        "worker": self.worker_pid,
                        "route": route,
                        "engine": ex.engine,
                        "endpoint": ex.endpoint,
                        "stream": ex.stream,
                        "status": ex.status,
                        "attempts": ex.attempts,
                        "latency_ms": round(elapsed * 1000, 2),
                        "ttft_ms": None if ex.ttft_s is None else round(ex.ttft_s * 1000, 2),
                        "prompt_tokens": prompt,
                        "completion_tokens": completion,
                        "error": ex.error,
                    }
                ).decode()
            )


async def _run_until_disconnect(receive: Receive, work: Any) -> bool:
    """Run *work*; if the client disconnects first, cancel it (closing the engine request).

    Returns False when the client went away, True when *work* finished.
    """
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


def _parse_json(body: bytes) -> dict[str, Any]:
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError as err:
        raise APIError(400, f"request body is not valid JSON: {err}", code="invalid_json") from None
    if not isinstance(payload, dict):
        raise APIError(400, "request body must be a JSON object", code="invalid_json")
    return payload


def _request_id(scope: Scope) -> str:
    for name, value in scope["headers"]:
        if name == b"x-request-id" and _REQUEST_ID.match(value):
            return value.decode()
    return os.urandom(12).hex()


def _method_not_allowed(method: str, path: str, allowed: str) -> APIError:
    return APIError(
        405,
        f"method {method} is not allowed on {path}; use {allowed}",
        code="method_not_allowed",
        headers=[(b"allow", allowed.encode())],
    )
