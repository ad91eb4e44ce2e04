"""Active health checks against a real HTTP server on loopback: when an engine leaves rotation."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from kiban.config import ConfigError, parse_config
from kiban.gateway.engines import Engine
from kiban.gateway.health import HealthChecker
from kiban.gateway.metrics import Metrics
from kiban.gateway.routing import Router

#: what the scripted /health does on each call: "ok", "slow" (past the check's timeout) or "500"
Script = list[str]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ScriptedHealth:
    """A loopback server whose /health answers as scripted, call by call."""

    def __init__(self) -> None:
        self.script: Script = []
        self.port = _free_port()
        self._runner: web.AppRunner | None = None

    async def _health(self, _request: web.Request) -> web.Response:
        step = self.script.pop(0) if self.script else "ok"
        if step == "slow":
            await asyncio.sleep(2)
        return web.Response(status=500 if step == "500" else 200, text=step)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/health", self._health)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


@pytest.fixture
async def server() -> AsyncIterator[ScriptedHealth]:
    srv = ScriptedHealth()
    await srv.start()
    try:
        yield srv
    finally:
        await srv.stop()


@pytest.fixture
async def upstream(server: ScriptedHealth) -> AsyncIterator[Engine]:
    """The engine `e` of a one-route configuration, its pool open on the server's port."""
    port = server.port
    raw = {
        "engines": [
            {"name": "e", "kind": "vllm", "url": f"http://127.0.0.1:{port}", "models": ["m"]}
        ],
        "routes": [{"model": "m", "engines": ["e"]}],
    }
    engine = Router(parse_config(raw, {})).engines["e"]
    engine.connect(asyncio.get_running_loop())
    try:
        yield engine
    finally:
        assert engine.http is not None
        engine.http.close()


async def _states(checker: HealthChecker, upstream: Engine, n: int) -> list[bool]:
    states = []
    for _ in range(n):
        await checker.check(upstream)
        states.append(upstream.healthy)
    return states


async def test_slow_and_failed_checks_eject_only_after_the_configured_run(
    server: ScriptedHealth, upstream: Engine
) -> None:
    checker = HealthChecker([upstream], Metrics(), interval_s=60, timeout_s=0.3, failures=3)
    # first check passes; two misses keep it in rotation; the third ejects; one pass restores
    server.script = ["ok", "slow", "500", "slow", "ok", "500", "ok"]
    assert await _states(checker, upstream, 7) == [True, True, True, False, True, True, True]
    assert upstream.health_misses == 0


async def test_first_check_decides_at_once(server: ScriptedHealth, upstream: Engine) -> None:
    checker = HealthChecker([upstream], Metrics(), interval_s=60, timeout_s=0.3, failures=3)
    server.script = ["500"]
    assert await _states(checker, upstream, 1) == [False]
    assert upstream.last_health_error == "HTTP 500"


async def test_refused_connection_ejects_at_once(server: ScriptedHealth, upstream: Engine) -> None:
    checker = HealthChecker([upstream], Metrics(), interval_s=60, timeout_s=0.3, failures=3)
    assert await _states(checker, upstream, 1) == [True]
    await server.stop()  # nothing listens on the port any more
    assert await _states(checker, upstream, 1) == [False]


async def test_one_failure_ejects_when_configured_so(
    server: ScriptedHealth, upstream: Engine
) -> None:
    checker = HealthChecker([upstream], Metrics(), interval_s=60, timeout_s=0.3, failures=1)
    server.script = ["ok", "slow", "ok"]
    assert await _states(checker, upstream, 3) == [True, False, True]


def test_health_failures_must_be_positive() -> None:
    raw = {
        "gateway": {"health_failures": 0},
        "engines": [{"name": "e", "kind": "vllm", "url": "http://127.0.0.1:1", "models": ["m"]}],
        "routes": [{"model": "m", "engines": ["e"]}],
    }
    with pytest.raises(ConfigError, match=r"gateway.health_failures: .*got 0"):
        parse_config(raw, {})
