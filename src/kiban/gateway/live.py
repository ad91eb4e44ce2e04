"""The live configuration of a gateway process, and its reload (SIGHUP).

Everything a configuration decides (routes, engines, keys) lives in one
:class:`Live` object that a request reads once; a reload builds a new one
and swaps it in, so requests in flight finish on the one they started with.
An invalid configuration changes nothing: the running one keeps serving.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson

from kiban.config import ConfigError, KibanConfig
from kiban.gateway.auth import ApiKey, KeyChecker
from kiban.gateway.engines import Engine
from kiban.gateway.openapi import openapi_document
from kiban.gateway.routing import Router
from kiban.gateway.structured import StructuredService

if TYPE_CHECKING:
    from kiban.gateway.app import Gateway

log = logging.getLogger("kiban.gateway")

#: gateway settings a reload cannot change in a running process
RESTART_ONLY = (
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


class Reloader:
    """Reloads *gateway*'s configuration from its ``config_source``, one reload at a time."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self._task: asyncio.Task[None] | None = None
        self._again = False

    def request(self) -> None:
        """SIGHUP: reload in the background (one at a time; a signal meanwhile runs one more)."""
        if self._task is not None and not self._task.done():
            self._again = True
            return
        self._task = asyncio.get_running_loop().create_task(self._loop())

    def cancel(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def _loop(self) -> None:
        while True:
            self._again = False
            try:
                await self.reload()
            except Exception as exc:
                log.exception("reload failed; the previous configuration keeps serving")
                self._report(self.gateway.live, False, [f"internal error: {exc!r}"], [])
            if not self._again:
                return

    async def reload(self) -> list[str]:
        """Load the configuration again and apply it; returns the problems (none: applied)."""
        gw = self.gateway
        assert gw.config_source is not None
        old = gw.live
        try:
            config, keys = await asyncio.to_thread(gw.config_source)
            live = build_live(config, keys, old)
        except ConfigError as err:
            for problem in err.problems:
                log.error("reload rejected: %s: %s", err.source, problem)
            log.error("reload rejected; the previous configuration keeps serving")
            gw.metrics.reloads.labels("rejected").inc()
            problems = list(err.problems)
            self._report(old, False, problems, [])
            return problems
        fresh = _swap_engines(old, live)
        if gw.health is not None:
            await asyncio.gather(*(gw.health.check(u) for u in fresh))
        gw.live = live
        gw.metrics.prepare(live.router.routes)
        gw.usage.metrics.prepare(k.name for k in live.keys.keys)
        gw.circuits.watch(live.router.engines.values())
        if gw.shared is not None:
            await gw.shared.sync_circuits([u.name for u in fresh])
        if gw.health is not None:
            gw.health.engines = list(live.router.engines.values())
            gw.after_health_checks()
        if gw.load is not None:
            gw.load.engines = list(live.router.engines.values())
        notes = [
            f"gateway.{key} changed; it applies when the gateway restarts"
            for key in RESTART_ONLY
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
        gw.metrics.reloads.labels("applied").inc()
        self._report(live, True, [], notes)
        return []

    def _report(self, live: Live, ok: bool, problems: list[str], notes: list[str]) -> None:
        if self.gateway.on_reload is not None:
            outcome: dict[str, Any] = {
                "pid": self.gateway.worker_pid,
                "ok": ok,
                "generation": live.generation,
                "problems": problems,
                "notes": notes,
                "at": time.time(),
            }
            self.gateway.on_reload(outcome)


def _swap_engines(old: Live, live: Live) -> list[Engine]:
    """Connect *live*'s new engines and let the dropped ones close; returns the new ones."""
    known = {id(u) for u in old.router.engines.values()}
    fresh = [u for u in live.router.engines.values() if id(u) not in known]
    loop = asyncio.get_running_loop()
    for engine in fresh:
        engine.connect(loop)
    kept = {id(u) for u in live.router.engines.values()}
    for engine in old.router.engines.values():
        if id(engine) not in kept and engine.http is not None:
            engine.http.close_idle()  # busy ones finish their requests, then close
    return fresh
