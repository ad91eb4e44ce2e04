"""The gateway as a plain ASGI application.

No web framework sits on the hot path: the routes are a handful of exact
paths, and a request body is parsed once (orjson) for what routing needs and
forwarded as the same bytes unless the engine knows the model by another name
(or, on a stream, with ``include_usage`` spliced in: :mod:`kiban.gateway.stream_usage`).

One inference request reads top-down in :meth:`Gateway.inference`: ``admit``
(:mod:`kiban.gateway.admission`), ``forward`` (:mod:`kiban.gateway.proxy`,
:mod:`kiban.gateway.disconnect`) and ``settle`` (metrics, request log, usage,
token budget). The live configuration and its reload are in
:mod:`kiban.gateway.live`, the GET endpoints in :mod:`kiban.gateway.endpoints`.
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
from typing import Any

from kiban import api_errors as errors
from kiban.api_errors import APIError, ErrorCode
from kiban.config import KibanConfig
from kiban.gateway import endpoints
from kiban.gateway.admission import (
    Admitted,
    auth_and_type,
    authorize,
    check_content_type,
    has_images,
    parse_json,
    route_for,
    stream_flag,
    structured_for,
)
from kiban.gateway.asgi import ClientDisconnected, Receive, Scope, Send, read_body, send_response
from kiban.gateway.auth import ApiKey, Grant, load_keys
from kiban.gateway.circuits import CircuitWatch
from kiban.gateway.console import PREFIXES as CONSOLE_PREFIXES
from kiban.gateway.console import Console
from kiban.gateway.disconnect import end_stream, run_until_disconnect
from kiban.gateway.engine_load import LoadScraper
from kiban.gateway.engines import Circuit
from kiban.gateway.health import HealthChecker
from kiban.gateway.limits import (
    LimitStore,
    LocalLimitStore,
    completion_cap,
    prompt_estimate,
    tokens_used,
)
from kiban.gateway.live import ConfigSource, Live, Reloader, build_live
from kiban.gateway.metrics import Metrics
from kiban.gateway.periodic import Periodic
from kiban.gateway.proxy import Exchange, Proxy
from kiban.gateway.request_log import RequestLog, request_entry
from kiban.gateway.routing import Route, Router
from kiban.gateway.stream_usage import ask_for_usage
from kiban.gateway.structured import answered_by
from kiban.gateway.usage import Usage
from kiban.gateway.usage_store import SqliteUsageStore, UsageStore, usage_path
from kiban.run_state import RUN_STATE_ENV, gpu_verdicts

log = logging.getLogger("kiban.gateway")
#: how often the routing strategies' counts reach Prometheus (each exposition publishes too)
TALLY_PUBLISH_S = 1.0

_INFERENCE = {
    "/v1/chat/completions": "chat",
    "/v1/completions": "completions",
    "/v1/embeddings": "embeddings",
}
_REQUEST_ID = re.compile(rb"^[A-Za-z0-9._:-]{1,128}$")
_JSON = endpoints.JSON


class Gateway:
    """ASGI callable: OpenAI-compatible endpoints in front of the configured engines."""

    def __init__(self, config: KibanConfig, keys: list[ApiKey] | None = None) -> None:
        keys = load_keys(config.gateway.api_keys) if keys is None else keys
        self.live = build_live(config, keys)
        self.metrics = Metrics()
        self.metrics.prepare(self.live.router.routes)
        self.tallies = Periodic(TALLY_PUBLISH_S, self._publish_tallies)
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
        self.circuits = CircuitWatch(self.metrics)
        self.config_source: ConfigSource | None = None
        self.on_reload: Callable[[dict[str, Any]], None] | None = None
        # the console's plan view; the serving process sets the planner's (the hot path imports
        # no planner)
        self.plan_view: Callable[[KibanConfig], dict[str, Any]] | None = None
        self.reloader = Reloader(self)

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

            self.shared = self.limits = self.circuits.shared = RedisState(
                gw.shared_state, self.metrics
            )
            await self.shared.start([u.name for u in engines], self._remote_circuit)
        self.usage.start(self._usage_store())
        self.tallies.start()
        self.circuits.watch(engines)
        self.health = HealthChecker(
            engines,
            self.metrics,
            gw.health_interval_s,
            gw.health_timeout_s,
            gw.health_failures,
            on_checked=self.after_health_checks,
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
                asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, self.reloader.request)

    def _usage_store(self) -> UsageStore | None:
        """Redis with shared state (replicas add up), else SQLite beside the keys file."""
        if self.shared is not None:
            from kiban.gateway.usage_store import RedisUsageStore

            return RedisUsageStore(self.shared.redis, self.shared.config.prefix)
        keys_file = self.config.gateway.api_keys.file
        return SqliteUsageStore(usage_path(keys_file)) if keys_file is not None else None

    async def _publish_tallies(self) -> None:
        self.metrics.publish_tallies()

    def _remote_circuit(self, engine: str, state: Circuit, remaining_s: float) -> None:
        self.circuits.apply_remote(self.router.engines.get(engine), state, remaining_s)

    def after_health_checks(self) -> None:
        """After each round of health checks (and a reload): route health and GPU verdicts."""
        self.metrics.routes_health(self.router.routes)
        for engine, verified in gpu_verdicts(os.environ.get(RUN_STATE_ENV)).items():
            self.metrics.set_gpu_verified(engine, verified)

    async def shutdown(self) -> None:
        self.reloader.cancel()
        if self.health is not None:
            await self.health.stop()
        if self.load is not None:
            await self.load.stop()
        await self.usage.close()
        await self.tallies.stop()
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

    # -- HTTP --------------------------------------------------------------------------------

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        path, method = scope["path"], scope["method"]
        request_id = _client_request_id(scope) or f"{self._id_prefix}{next(self._id_counter):x}"
        try:
            endpoint = _INFERENCE.get(path)
            if endpoint is not None:
                if method != "POST":
                    raise errors.method_not_allowed(method, path, "POST")
                await self.inference(scope, receive, send, endpoint, request_id)
            elif path in endpoints.PATHS:
                if method not in ("GET", "HEAD"):
                    raise errors.method_not_allowed(method, path, "GET")
                await endpoints.answer_get(self, scope, send, path, request_id)
            elif path.startswith(CONSOLE_PREFIXES):
                if method not in ("GET", "HEAD"):
                    raise errors.method_not_allowed(method, path, "GET")
                await self.console.handle(scope, send, path, request_id)
            else:
                raise errors.unknown_path(path)
        except APIError as err:
            headers = [*_JSON, (b"x-request-id", request_id.encode()), *err.headers]
            await send_response(send, err.status, err.body(), headers)
        except ClientDisconnected:
            pass
        except Exception:
            log.exception("internal error answering request %s", request_id)
            error = errors.internal_error(request_id)
            headers = [*_JSON, (b"x-request-id", request_id.encode()), (b"connection", b"close")]
            with contextlib.suppress(Exception):  # the response may have started already
                await send_response(send, 500, error.body(), headers)

    # -- one inference request: admit, forward, settle ---------------------------------------

    async def inference(
        self, scope: Scope, receive: Receive, send: Send, endpoint: str, request_id: str
    ) -> None:
        """One inference request, on the live configuration it started with."""
        live = self.live
        admitted = await self.admit(live, scope, receive, endpoint, request_id)
        in_flight = self.metrics.in_flight_for(admitted.route.name)
        in_flight.inc()
        try:
            await self.forward(admitted, scope, receive, send)
        finally:
            in_flight.dec()
            await self.settle(admitted, live)

    async def admit(
        self, live: Live, scope: Scope, receive: Receive, endpoint: str, request_id: str
    ) -> Admitted:
        """Every check before an engine is touched, and the key's rate limits taken."""
        authorization, content_type = auth_and_type(scope)
        grant = authorize(live, self.metrics, authorization)
        check_content_type(content_type)
        body = await read_body(scope, receive, live.config.gateway.max_body_bytes)
        payload = parse_json(body)
        model, route = route_for(live, grant, payload)
        stream = stream_flag(payload)
        body_size, drop_usage = len(body), False
        if stream and endpoint != "embeddings":
            body, drop_usage = ask_for_usage(payload, body)
        prompt = reserved = 0
        if grant.limited:
            if grant.limits.tokens_per_minute:
                prompt = prompt_estimate(body_size)
                reserved = prompt + completion_cap(payload)
            await self._take_limits(grant, route, reserved)
        needs_images = endpoint == "chat" and has_images(payload.get("messages"))
        ex = Exchange(
            request_id=request_id,
            endpoint=endpoint,
            body=body,
            payload=payload,
            model=model,
            stream=stream,
            client_headers=scope["headers"],
            structured=structured_for(live, payload, route, endpoint),
            drop_usage=drop_usage,
        )
        return Admitted(ex, route, grant, needs_images, prompt, reserved, body_size)

    async def forward(self, admitted: Admitted, scope: Scope, receive: Receive, send: Send) -> None:
        """The proxy answers the request, unless the client leaves or the gateway stops first."""
        ex, route = admitted.ex, admitted.route
        assert self.proxy is not None  # set at startup, before the first request
        try:
            work = self.proxy.handle(ex, route, send, admitted.needs_images)
            if not await run_until_disconnect(scope, receive, work):
                ex.status = ex.status or 499
                ex.error = "client_disconnected"
        except APIError as err:
            ex.status = err.status
            ex.error = err.error.label
            if ex.structured is not None:
                answered_by(err)
            if err.error.rate_limit is not None:
                self.metrics.rate_limited(route.name, err.error.rate_limit)
            raise
        except asyncio.CancelledError:
            # only the server's shutdown deadline cancels a request task
            ex.status, ex.error = ex.status or 503, "gateway_shutdown"
            if ex.committed and ex.stream:
                await end_stream(send, "the gateway is shutting down", "gateway_shutdown")
            raise
        except Exception:
            if not ex.committed:
                raise
            log.exception("internal error relaying request %s", ex.request_id)
            ex.error = ErrorCode.INTERNAL_ERROR.label
            await end_stream(send, "internal error in the gateway", ErrorCode.INTERNAL_ERROR)

    async def settle(self, admitted: Admitted, live: Live) -> None:
        """Metrics, the request log and usage; the key's token budget trued up to what was used."""
        ex, grant = admitted.ex, admitted.grant
        self._record(ex, admitted.route.name, live)
        self.usage.record(grant.name, ex, admitted.prompt or prompt_estimate(admitted.body_size))
        if grant.limits.tokens_per_minute:
            chunks = ex.chunks if ex.stream else 0
            used = tokens_used(ex.usage, chunks, admitted.prompt, ex.status, admitted.reserved)
            if used != admitted.reserved:
                await self.limits.settle(grant.bucket, grant.limits, used - admitted.reserved)

    async def _take_limits(self, grant: Grant, route: Route, tokens: int) -> None:
        """Take from the key's buckets, or answer 429 before any engine is touched."""
        wait, which = await self.limits.admit(grant.bucket, grant.limits, tokens)
        if wait <= 0:
            return
        self.metrics.rate_limited(route.name, which)
        self.usage.rejected(grant.name, which)
        seconds = max(1, math.ceil(wait))
        raise errors.rate_limit_exceeded(which, getattr(grant.limits, which), seconds)

    def _record(self, ex: Exchange, route: str, live: Live) -> None:
        elapsed = time.perf_counter() - ex.started
        self.metrics.observe_exchange(route, ex, elapsed)
        self.console.state.errors.observe(ex, route)
        if ex.structured is not None:
            self.metrics.structured_result(route, ex.error or ex.structured.how or "none")
        if live.config.gateway.request_log:
            assert self.loop is not None  # set at startup
            self.request_log.write(request_entry(ex, route, self.worker_pid, elapsed), self.loop)


def _client_request_id(scope: Scope) -> str | None:
    """The client's own X-Request-Id, when it is a sane one."""
    headers: list[tuple[bytes, bytes]] = scope["headers"]
    for name, value in headers:
        if name == b"x-request-id" and _REQUEST_ID.match(value):
            return value.decode()
    return None
