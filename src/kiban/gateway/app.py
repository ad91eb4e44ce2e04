"""The gateway as a plain ASGI application.

No web framework sits on the hot path: the routes are a handful of exact
paths, and a request body is parsed once (orjson) for what routing needs and
forwarded as the same bytes unless the engine knows the model by another name
(or, on a stream, with ``include_usage`` spliced in: :mod:`kiban.gateway.stream_usage`).

Everything a configuration decides (routes, engines, keys) lives in one
:class:`Live` object that a request reads once; a reload builds a new one
and swaps it in, so requests in flight finish on the one they started with.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import os
import re
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson

from kiban.config import ConfigError, KibanConfig
from kiban.deploy.state import RUN_STATE_ENV, gpu_verdicts
from kiban.gateway.asgi import ClientDisconnected, Receive, Scope, Send, read_body, send_response
from kiban.gateway.auth import ApiKey, Grant, KeyChecker, load_keys
from kiban.gateway.console import PREFIXES as CONSOLE_PREFIXES
from kiban.gateway.console import Console
from kiban.gateway.engine_load import LoadScraper
from kiban.gateway.engines import Circuit, Engine
from kiban.gateway.errors import APIError, error_event
from kiban.gateway.health import HealthChecker
from kiban.gateway.limits import (
    LimitStore,
    LocalLimitStore,
    completion_cap,
    prompt_estimate,
    tokens_used,
)
from kiban.gateway.metrics import Metrics
from kiban.gateway.openapi import openapi_document
from kiban.gateway.proxy import Exchange, Proxy
from kiban.gateway.request_log import RequestLog
from kiban.gateway.routing import Route, Router
from kiban.gateway.server_protocol import DISCONNECT_HOOK
from kiban.gateway.stream_usage import ask_for_usage
from kiban.gateway.usage import Usage
from kiban.gateway.usage_store import SqliteUsageStore, UsageStore, usage_path
from kiban.structured.constraint import STRUCTURED_KEYS
from kiban.structured.request import StructuredService, answered_by

log = logging.getLogger("kiban.gateway")

_INFERENCE = {
    "/v1/chat/completions": "chat",
    "/v1/completions": "completions",
    "/v1/embeddings": "embeddings",
}
_GET_ROUTES = ("/health", "/ready", "/metrics", "/v1/models", "/openapi.json")
_REQUEST_ID = re.compile(rb"^[A-Za-z0-9._:-]{1,128}$")
_JSON = [(b"content-type", b"application/json")]
_IMAGE_PARTS = frozenset({"image_url", "input_image", "image"})
#: gateway settings a reload cannot change in a running process
_RESTART_ONLY = (
    "host",
    "port",
    "workers",
    "http",
    "shared_state",
    "shutdown_grace_s",
    "engine_load_interval_s",
    "kv_avoid_ratio",
    "usage_flush_s",
)

#: loads the configuration again (a reload): returns it with its keys, or raises ConfigError
ConfigSource = Callable[[], tuple[KibanConfig, list[ApiKey]]]


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


@dataclass(slots=True)
class Live:
    """What one configuration decides, swapped whole on reload."""

    config: KibanConfig
    router: Router
    structured: StructuredService
    keys: KeyChecker
    openapi: bytes
    generation: int = 1


def build_live(config: KibanConfig, keys: list[ApiKey], previous: Live | None = None) -> Live:
    """The live objects of *config*; engines unchanged since *previous* keep their state."""
    router = Router(config, reuse=previous.router.engines if previous else None)

    def route_of(model: str) -> str | None:
        route = router.route_for(model)
        return route.name if route is not None else None

    checker = KeyChecker(keys, config.gateway.limits, route_of)
    return Live(
        config=config,
        router=router,
        structured=StructuredService(config.routes),
        keys=checker,
        openapi=orjson.dumps(openapi_document(router.public_models)),
        generation=previous.generation + 1 if previous else 1,
    )


class Gateway:
    """ASGI callable: OpenAI-compatible endpoints in front of the configured engines."""

    def __init__(self, config: KibanConfig, keys: list[ApiKey] | None = None) -> None:
        keys = load_keys(config.gateway.api_keys) if keys is None else keys
        self.live = build_live(config, keys)
        self.metrics = Metrics()
        self.metrics.prepare(self.live.router.routes)
        self.limits: LimitStore = LocalLimitStore()
        self.usage = Usage(self.metrics.registry, config.gateway.usage_flush_s)
        self.usage.metrics.prepare(k.name for k in self.live.keys.keys)
        self.console = Console(self)
        self.shared: Any = None  # a RedisState when gateway.shared_state is configured
        self.proxy: Proxy | None = None
        self.health: HealthChecker | None = None
        self.load: LoadScraper | None = None
        self.created = int(time.time())
        self.worker_pid = os.getpid()
        self.request_log = RequestLog()
        self.loop: asyncio.AbstractEventLoop | None = None
        # request ids: one random prefix per process, then a counter (no syscall per request)
        self._id_prefix = os.urandom(6).hex()
        self._id_counter = itertools.count(1)
        self.config_source: ConfigSource | None = None
        self.on_reload: Callable[[dict[str, Any]], None] | None = None
        self._reloading: asyncio.Task[None] | None = None
        self._reload_again = False

    @property
    def config(self) -> KibanConfig:
        return self.live.config

    @property
    def router(self) -> Router:
        return self.live.router

    # -- lifecycle ---------------------------------------------------------------------------

    async def startup(self) -> None:
        loop = self.loop = asyncio.get_running_loop()
        for engine in self.router.engines.values():
            engine.connect(loop)
        self.proxy = Proxy(self.metrics, loop)
        gw = self.config.gateway
        engines = list(self.router.engines.values())
        if gw.shared_state is not None:
            from kiban.gateway.shared import RedisState

            self.shared = self.limits = RedisState(gw.shared_state, self.metrics)
            await self.shared.start([u.name for u in engines], self._remote_circuit)
        self.usage.start(self._usage_store())
        self._watch_circuits()
        self.health = HealthChecker(
            engines,
            self.metrics,
            gw.health_interval_s,
            gw.health_timeout_s,
            gw.health_failures,
            on_checked=self._after_health_checks,
        )
        await self.health.check_all()
        self.health.start()
        if gw.engine_load_interval_s:
            self.load = LoadScraper(
                engines, gw.engine_load_interval_s, gw.health_timeout_s, gw.kv_avoid_ratio
            )
            self.load.start()
        if self.config_source is not None:
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, self.request_reload)

    def _usage_store(self) -> UsageStore | None:
        """Redis with shared state (replicas add up), else SQLite beside the keys file."""
        if self.shared is not None:
            from kiban.gateway.usage_store import RedisUsageStore

            return RedisUsageStore(self.shared.redis, self.shared.config.prefix)
        keys_file = self.config.gateway.api_keys.file
        return SqliteUsageStore(usage_path(keys_file)) if keys_file is not None else None

    def _watch_circuits(self) -> None:
        """A breaker that opens or closes shows in the metrics at once (and in other replicas)."""
        for engine in self.router.engines.values():
            if engine.breaker.on_change is None:
                engine.breaker.on_change = lambda state, u=engine: self._circuit_changed(u, state)

    def _circuit_changed(self, engine: Engine, state: Circuit) -> None:
        self.metrics.engine_health(engine)
        if state is Circuit.OPEN:
            log.warning(
                "engine %s: circuit open (ejected for %g s)",
                engine.name,
                engine.breaker.cooldown_s,
            )
        else:
            log.info("engine %s: circuit closed (admitted again)", engine.name)
        if self.shared is not None:
            self.shared.circuit_changed(engine.name, state, engine.breaker.cooldown_s)

    def _remote_circuit(self, name: str, state: Circuit, remaining_s: float) -> None:
        engine = self.router.engines.get(name)
        if engine is not None:
            engine.breaker.apply_remote(state, remaining_s, time.monotonic())
            self.metrics.engine_health(engine)

    def _after_health_checks(self) -> None:
        self.metrics.routes_health(self.router.routes)
        for engine, verified in gpu_verdicts(os.environ.get(RUN_STATE_ENV)).items():
            self.metrics.set_gpu_verified(engine, verified)

    async def shutdown(self) -> None:
        if self._reloading is not None:
            self._reloading.cancel()
        if self.health is not None:
            await self.health.stop()
        if self.load is not None:
            await self.load.stop()
        await self.usage.close()
        if self.shared is not None:
            await self.shared.close()
        for engine in self.router.engines.values():
            if engine.http is not None:
                engine.http.close()
        self.request_log.flush()
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

    # -- reload ------------------------------------------------------------------------------

    def request_reload(self) -> None:
        """SIGHUP: reload in the background (one at a time; a signal meanwhile runs one more)."""
        if self._reloading is not None and not self._reloading.done():
            self._reload_again = True
            return
        self._reloading = asyncio.get_running_loop().create_task(self._reload_loop())

    async def _reload_loop(self) -> None:
        while True:
            self._reload_again = False
            try:
                await self.reload()
            except Exception as exc:
                log.exception("reload failed; the previous configuration keeps serving")
                self._report_reload(self.live, False, [f"internal error: {exc!r}"], [])
            if not self._reload_again:
                return

    async def reload(self) -> list[str]:
        """Load the configuration again and apply it; returns the problems (none: applied).

        An invalid configuration changes nothing: the running one keeps serving.
        """
        assert self.config_source is not None
        old = self.live
        try:
            config, keys = await asyncio.to_thread(self.config_source)
            live = build_live(config, keys, old)
        except ConfigError as err:
            for problem in err.problems:
                log.error("reload rejected: %s: %s", err.source, problem)
            log.error("reload rejected; the previous configuration keeps serving")
            self.metrics.reloads.labels("rejected").inc()
            self._report_reload(old, False, err.problems, [])
            return err.problems
        known = {id(u) for u in old.router.engines.values()}
        fresh = [u for u in live.router.engines.values() if id(u) not in known]
        loop = asyncio.get_running_loop()
        for engine in fresh:
            engine.connect(loop)
        kept = {id(u) for u in live.router.engines.values()}
        for engine in old.router.engines.values():
            if id(engine) not in kept and engine.http is not None:
                engine.http.close_idle()  # busy ones finish their requests, then close
        if self.health is not None:
            await asyncio.gather(*(self.health.check(u) for u in fresh))
        self.live = live
        self.metrics.prepare(live.router.routes)
        self.usage.metrics.prepare(k.name for k in live.keys.keys)
        self._watch_circuits()
        if self.shared is not None:
            await self.shared.sync_circuits([u.name for u in fresh])
        if self.health is not None:
            self.health.engines = list(live.router.engines.values())
            self._after_health_checks()
        if self.load is not None:
            self.load.engines = list(live.router.engines.values())
        notes = [
            f"gateway.{key} changed; it applies when the gateway restarts"
            for key in _RESTART_ONLY
            if getattr(old.config.gateway, key) != getattr(config.gateway, key)
        ]
        for note in notes:
            log.warning("reload: %s", note)
        log.info(
            "configuration reloaded (generation %d): %d routes, %d engines (%d new or changed)",
            live.generation,
            len(live.router.routes),
            len(live.router.engines),
            len(fresh),
        )
        self.metrics.reloads.labels("applied").inc()
        self._report_reload(live, True, [], notes)
        return []

    def _report_reload(self, live: Live, ok: bool, problems: list[str], notes: list[str]) -> None:
        if self.on_reload is not None:
            self.on_reload(
                {
                    "pid": self.worker_pid,
                    "ok": ok,
                    "generation": live.generation,
                    "problems": problems,
                    "notes": notes,
                    "at": time.time(),
                }
            )

    # -- HTTP --------------------------------------------------------------------------------

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        path, method = scope["path"], scope["method"]
        request_id = _client_request_id(scope) or f"{self._id_prefix}{next(self._id_counter):x}"
        try:
            endpoint = _INFERENCE.get(path)
            if endpoint is not None:
                if method != "POST":
                    raise _method_not_allowed(method, path, "POST")
                await self._inference(scope, receive, send, endpoint, request_id)
            elif path in _GET_ROUTES:
                if method not in ("GET", "HEAD"):
                    raise _method_not_allowed(method, path, "GET")
                await self._get(scope, send, path, request_id)
            elif path.startswith(CONSOLE_PREFIXES):
                if method not in ("GET", "HEAD"):
                    raise _method_not_allowed(method, path, "GET")
                await self.console.handle(scope, send, path, request_id)
            else:
                raise APIError(404, f"unknown path {path!r}", code="unknown_path")
        except APIError as err:
            headers = [*_JSON, (b"x-request-id", request_id.encode()), *err.headers]
            await send_response(send, err.status, err.body(), headers)
        except ClientDisconnected:
            pass
        except Exception:
            log.exception("internal error answering request %s", request_id)
            error = APIError(
                500,
                f"internal error in the gateway (request id {request_id}); see its log",
                "server_error",
                code="internal_error",
            )
            headers = [*_JSON, (b"x-request-id", request_id.encode()), (b"connection", b"close")]
            with contextlib.suppress(Exception):  # the response may have started already
                await send_response(send, 500, error.body(), headers)

    def _grant(self, live: Live, authorization: bytes | None) -> Grant:
        grant = live.keys.grant_for(authorization)
        if grant is None:
            self.metrics.auth_rejections.inc()
            raise APIError(
                401,
                "missing or invalid API key; send 'Authorization: Bearer <key>'",
                "authentication_error",
                code="invalid_api_key",
            )
        return grant

    async def _get(self, scope: Scope, send: Send, path: str, request_id: str) -> None:
        rid = [(b"x-request-id", request_id.encode())]
        live = self.live
        if path == "/health":
            await send_response(send, 200, b'{"status":"ok"}', _JSON + rid)
        elif path == "/ready":
            missing = [r.name for r in live.router.routes if not r.has_healthy_target()]
            status = 503 if missing else 200
            body = orjson.dumps({"ready": not missing, "routes_without_healthy_engine": missing})
            await send_response(send, status, body, _JSON + rid)
        elif path == "/metrics":
            # off the event loop: NVML readings (PCIe throughput samples for 20 ms per
            # GPU) took 57 ms a scrape on the H100, which would stall every stream
            body = await asyncio.to_thread(self.metrics.render)
            await send_response(send, 200, body, [(b"content-type", Metrics.content_type.encode())])
        elif path == "/openapi.json":
            await send_response(send, 200, live.openapi, _JSON + rid)
        else:
            grant = self._grant(live, _header(scope, b"authorization"))
            data = [
                {"id": name, "object": "model", "created": self.created, "owned_by": "kiban"}
                for name in _models_allowed(live, grant)
            ]
            body = orjson.dumps({"object": "list", "data": data})
            await send_response(send, 200, body, _JSON + rid)

    async def _inference(
        self, scope: Scope, receive: Receive, send: Send, endpoint: str, request_id: str
    ) -> None:
        live = self.live
        authorization = content_type = None
        for name, value in scope["headers"]:
            if name == b"authorization":
                authorization = value
            elif name == b"content-type":
                content_type = value
        grant = self._grant(live, authorization)
        if content_type is not None and not _is_json(content_type):
            raise APIError(
                415,
                f"Content-Type {content_type.decode('latin-1')[:100]!r} is not accepted; "
                "send the body as JSON with 'Content-Type: application/json'",
                code="unsupported_media_type",
            )
        body = await read_body(scope, receive, live.config.gateway.max_body_bytes)
        payload = _parse_json(body)
        model = payload.get("model")
        if not isinstance(model, str) or not model:
            raise APIError(
                400, "'model' is required and must be a string", param="model", code="missing_model"
            )
        route = live.router.route_for(model)
        if route is None:
            available = ", ".join(live.router.public_models)
            raise APIError(
                404,
                f"model {model!r} does not exist; available models: {available}",
                param="model",
                code="model_not_found",
            )
        if grant.routes is not None and route.name not in grant.routes:
            raise _not_allowed(live, grant, model)
        stream = payload.get("stream", False)
        if stream is not None and not isinstance(stream, bool):
            raise APIError(400, "'stream' must be a boolean", param="stream")
        body_size, drop_usage = len(body), False
        if stream and endpoint != "embeddings":
            body, drop_usage = ask_for_usage(payload, body)
        reserved = prompt = 0
        if grant.limited:
            if grant.limits.tokens_per_minute:
                prompt = prompt_estimate(body_size)
                reserved = prompt + completion_cap(payload)
            await self._admit(grant, route, reserved)
        needs_images = endpoint == "chat" and has_images(payload.get("messages"))
        structured = None
        if endpoint != "embeddings" and (
            route.name in live.structured.fixed or not STRUCTURED_KEYS.isdisjoint(payload)
        ):
            try:
                structured = live.structured.prepare(payload, route)
            except RecursionError:
                raise answered_by(
                    APIError(
                        400,
                        "the structured-output constraint is nested too deeply",
                        code="too_deep",
                    )
                ) from None
            except APIError as err:
                raise answered_by(err) from None
        ex = Exchange(
            request_id=request_id,
            endpoint=endpoint,
            body=body,
            payload=payload,
            model=model,
            stream=bool(stream),
            client_headers=scope["headers"],
            structured=structured,
            drop_usage=drop_usage,
        )
        in_flight = self.metrics.in_flight_for(route.name)
        in_flight.inc()
        assert self.proxy is not None  # set at startup, before the first request
        try:
            work = self.proxy.handle(ex, route, send, needs_images)
            if not await _run_until_disconnect(scope, receive, work):
                ex.status = ex.status or 499
                ex.error = "client_disconnected"
        except APIError as err:
            ex.status = err.status
            ex.error = err.code or err.type
            if structured is not None:
                answered_by(err)
            if err.code == "engines_saturated":
                self.metrics.rate_limited(route.name, "engine_concurrency")
            elif err.code == "queue_timeout":
                self.metrics.rate_limited(route.name, "engine_queue_timeout")
            raise
        except asyncio.CancelledError:
            # only the server's shutdown deadline cancels a request task
            ex.status, ex.error = ex.status or 503, "gateway_shutdown"
            if ex.committed and ex.stream:
                await _end_stream(send, "the gateway is shutting down", "gateway_shutdown")
            raise
        except Exception:
            if not ex.committed:
                raise
            log.exception("internal error relaying request %s", request_id)
            ex.error = "internal_error"
            await _end_stream(send, "internal error in the gateway", "internal_error")
        finally:
            in_flight.dec()
            self._record(ex, route.name, live)
            self.usage.record(grant.name, ex, prompt or prompt_estimate(body_size))
            if grant.limits.tokens_per_minute:
                used = tokens_used(
                    ex.usage, ex.chunks if ex.stream else 0, prompt, ex.status, reserved
                )
                if used != reserved:
                    await self.limits.settle(grant.bucket, grant.limits, used - reserved)

    async def _admit(self, grant: Grant, route: Route, tokens: int) -> None:
        """Take from the key's buckets, or answer 429 before any engine is touched."""
        wait, which = await self.limits.admit(grant.bucket, grant.limits, tokens)
        if wait <= 0:
            return
        self.metrics.rate_limited(route.name, which)
        self.usage.rejected(grant.name, which)
        seconds = max(1, math.ceil(wait))
        raise APIError(
            429,
            f"this API key is over its {which} limit ({getattr(grant.limits, which)}); "
            f"retry in {seconds} s",
            "rate_limit_error",
            code="rate_limit_exceeded",
            headers=[(b"retry-after", str(seconds).encode())],
        )

    def _record(self, ex: Exchange, route: str, live: Live) -> None:
        elapsed = time.perf_counter() - ex.started
        self.metrics.observe_exchange(route, ex, elapsed)
        self.console.state.errors.observe(ex, route)
        usage = ex.usage or {}
        prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
        if ex.structured is not None:
            self.metrics.structured_result(route, ex.error or ex.structured.how or "none")
        if live.config.gateway.request_log:
            entry = {
                "request_id": ex.request_id,
                "worker": self.worker_pid,
                "route": route,
                "engine": ex.engine,
                "endpoint": ex.endpoint,
                "stream": ex.stream,
                "status": ex.status,
                "attempts": ex.attempts,
                "retries": ex.retries,
                "latency_ms": round(elapsed * 1000, 2),
                "ttft_ms": None if ex.ttft_s is None else round(ex.ttft_s * 1000, 2),
                "prompt_tokens": prompt,
                "completion_tokens": completion,
                "error": ex.error,
            }
            if ex.structured is not None:
                entry["structured"] = ex.error or ex.structured.how
            if ex.continuations is not None:
                entry["continuations"] = ex.continuations
            assert self.loop is not None  # set at startup
            self.request_log.write(entry, self.loop)


def _header(scope: Scope, wanted: bytes) -> bytes | None:
    headers: list[tuple[bytes, bytes]] = scope["headers"]
    for name, value in headers:
        if name == wanted:
            return value
    return None


def _is_json(content_type: bytes) -> bool:
    media = content_type.split(b";", 1)[0].strip().lower()
    return media == b"application/json" or media.endswith(b"+json")


def _models_allowed(live: Live, grant: Grant) -> list[str]:
    """The public model names the grant's key may use."""
    if grant.routes is None:
        return live.router.public_models
    return [
        name
        for name in live.router.public_models
        if (route := live.router.route_for(name)) is not None and route.name in grant.routes
    ]


def _not_allowed(live: Live, grant: Grant, model: str) -> APIError:
    allowed = _models_allowed(live, grant)
    return APIError(
        403,
        f"this API key may not use model {model!r}; it may use: {', '.join(allowed) or 'none'}",
        "permission_error",
        param="model",
        code="model_not_allowed",
    )


async def _end_stream(send: Send, message: str, code: str) -> None:
    """End a stream already under way with an error event (if the client is still there)."""
    with contextlib.suppress(Exception):
        event = error_event(message, "server_error", code)
        await send({"type": "http.response.body", "body": event, "more_body": False})


async def _run_until_disconnect(scope: Scope, receive: Receive, work: Any) -> bool:
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


async def _watch_receive(receive: Receive, work: Any) -> bool:
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


def _client_request_id(scope: Scope) -> str | None:
    """The client's own X-Request-Id, when it is a sane one."""
    headers: list[tuple[bytes, bytes]] = scope["headers"]
    for name, value in headers:
        if name == b"x-request-id" and _REQUEST_ID.match(value):
            return value.decode()
    return None


def _method_not_allowed(method: str, path: str, allowed: str) -> APIError:
    return APIError(
        405,
        f"method {method} is not allowed on {path}; use {allowed}",
        code="method_not_allowed",
        headers=[(b"allow", allowed.encode())],
    )
