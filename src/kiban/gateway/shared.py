"""State shared by gateway replicas through Redis: rate-limit buckets and circuit breakers.

Configured by ``gateway.shared_state``. Rate limits: each admission is one
``EVALSHA`` of a Lua script that refills and takes from the key's two buckets
atomically, on Redis' own clock (replicas' clocks may differ). Circuit
breakers: each replica still decides locally on every request (no Redis
round trip on the hot path); when a breaker opens or closes, the replica
publishes it, and every other replica applies the change at once. An open
circuit is also stored with its remaining cooldown as expiry, so a replica
that starts later finds it open.

Redis failing never fails a request: admission then passes (counted in
``kiban_shared_state_errors_total`` and logged at most every 10 s), and
circuits fall back to each replica's own view.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable

import orjson
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from kiban.config import RateLimits, SharedState
from kiban.gateway.engines import Circuit
from kiban.gateway.metrics import Metrics

log = logging.getLogger("kiban.shared")

_BUCKET_TTL_MS = 180_000  # a bucket refills fully within 60 s; idle ones expire after this
_LOG_EVERY_S = 10.0

_REFILL = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local rpm = tonumber(ARGV[1])
local tpm = tonumber(ARGV[2])
local v = redis.call('HMGET', KEYS[1], 'r', 't', 'at')
local r = tonumber(v[1]) or rpm
local tk = tonumber(v[2]) or tpm
local at = tonumber(v[3]) or now
local el = math.max(0, now - at)
if rpm > 0 then r = math.min(rpm, r + el * rpm / 60) end
if tpm > 0 then tk = math.min(tpm, tk + el * tpm / 60) end
"""

_ADMIT = (
    _REFILL
    + """
local want = tonumber(ARGV[3])
local wait = 0
local which = ''
if rpm > 0 and r < 1 then
  wait = (1 - r) * 60 / rpm
  which = 'requests_per_minute'
end
if tpm > 0 then
  local need = math.max(1, math.min(want, tpm))
  if tk < need then
    local w = (need - tk) * 60 / tpm
    if w > wait then
      wait = w
      which = 'tokens_per_minute'
    end
  end
end
if wait <= 0 then
  if rpm > 0 then r = r - 1 end
  if tpm > 0 then tk = tk - want end
end
redis.call('HSET', KEYS[1], 'r', tostring(r), 't', tostring(tk), 'at', tostring(now))
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return {tostring(wait), which}
"""
)

_SETTLE = (
    _REFILL
    + """
if tpm > 0 then tk = math.min(tpm, tk - tonumber(ARGV[3])) end
redis.call('HSET', KEYS[1], 'r', tostring(r), 't', tostring(tk), 'at', tostring(now))
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return 1
"""
)

#: (engine, state, remaining cooldown in seconds) -> None
CircuitListener = Callable[[str, Circuit, float], None]


class RedisState:
    """Rate-limit buckets and circuit-breaker events in one Redis."""

    shared = True

    def __init__(self, config: SharedState, metrics: Metrics) -> None:
        self.config = config
        self.metrics = metrics
        self.origin = f"{os.uname().nodename}:{os.getpid()}:{os.urandom(4).hex()}"
        self._prefix = config.prefix
        self._channel = f"{config.prefix}:circuit".encode()
        self.redis = aioredis.Redis.from_url(
            config.url,
            socket_timeout=config.timeout_s,
            socket_connect_timeout=config.timeout_s,
        )
        self._admit = self.redis.register_script(_ADMIT)
        self._settle = self.redis.register_script(_SETTLE)
        self._listener: CircuitListener | None = None
        self._subscriber: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[None]] = set()
        self._last_logged = 0.0

    # -- rate limits -----------------------------------------------------------------------

    async def admit(self, bucket: str, limits: RateLimits, tokens: int) -> tuple[float, str]:
        try:
            wait, which = await self._admit(
                keys=[f"{self._prefix}:rl:{bucket}"],
                args=[
                    limits.requests_per_minute or 0,
                    limits.tokens_per_minute or 0,
                    tokens,
                    _BUCKET_TTL_MS,
                ],
            )
        except (RedisError, OSError, TimeoutError) as exc:
            self._failed("admit", exc)
            return 0.0, ""
        return float(wait), which.decode() if isinstance(which, bytes) else str(which)

    async def settle(self, bucket: str, limits: RateLimits, tokens: int) -> None:
        if not limits.tokens_per_minute or not tokens:
            return
        try:
            await self._settle(
                keys=[f"{self._prefix}:rl:{bucket}"],
                args=[
                    limits.requests_per_minute or 0,
                    limits.tokens_per_minute,
                    tokens,
                    _BUCKET_TTL_MS,
                ],
            )
        except (RedisError, OSError, TimeoutError) as exc:
            self._failed("settle", exc)

    # -- circuit breakers ------------------------------------------------------------------

    def circuit_changed(self, engine: str, state: Circuit, cooldown_s: float) -> None:
        """A local breaker opened or closed: tell the other replicas (in the background)."""
        task = asyncio.get_running_loop().create_task(self._publish(engine, state, cooldown_s))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _publish(self, engine: str, state: Circuit, cooldown_s: float) -> None:
        key = f"{self._prefix}:circuit:{engine}"
        message = orjson.dumps(
            {"engine": engine, "state": int(state), "cooldown_s": cooldown_s, "origin": self.origin}
        )
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                if state is Circuit.OPEN:
                    pipe.set(key, self.origin, px=max(1, int(cooldown_s * 1000)))
                else:
                    pipe.delete(key)
                pipe.publish(self._channel, message)
                await pipe.execute()
        except (RedisError, OSError, TimeoutError) as exc:
            self._failed("circuit_publish", exc)

    async def start(self, engines: list[str], listener: CircuitListener) -> None:
        """Apply circuits other replicas left open, then follow their changes."""
        self._listener = listener
        await self.sync_circuits(engines)
        self._subscriber = asyncio.get_running_loop().create_task(self._follow())

    async def sync_circuits(self, engines: list[str]) -> None:
        """Open locally every engine's circuit that is open in Redis."""
        if not engines or self._listener is None:
            return
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                for engine in engines:
                    pipe.pttl(f"{self._prefix}:circuit:{engine}")
                remaining = await pipe.execute()
        except (RedisError, OSError, TimeoutError) as exc:
            self._failed("circuit_sync", exc)
            return
        for engine, ms in zip(engines, remaining, strict=True):
            if isinstance(ms, int) and ms > 0:
                self._listener(engine, Circuit.OPEN, ms / 1000)

    async def _follow(self) -> None:
        """Subscribe to circuit events, reconnecting with a backoff while Redis is away."""
        backoff = 0.5
        while True:
            client = aioredis.Redis.from_url(
                self.config.url, socket_connect_timeout=self.config.timeout_s
            )
            pubsub = client.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self._channel)
                backoff = 0.5
                async for message in pubsub.listen():
                    self._on_message(message.get("data"))
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError, TimeoutError) as exc:
                self._failed("circuit_subscribe", exc)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()
                    await client.aclose()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 10.0)

    def _on_message(self, data: bytes) -> None:
        try:
            event = orjson.loads(data)
            if event["origin"] == self.origin or self._listener is None:
                return
            self._listener(event["engine"], Circuit(event["state"]), float(event["cooldown_s"]))
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            log.warning("ignored a malformed circuit event on %s", self._channel.decode())

    # -- lifecycle -------------------------------------------------------------------------

    def _failed(self, operation: str, exc: BaseException) -> None:
        self.metrics.shared_state_error(operation)
        now = time.monotonic()
        if now - self._last_logged >= _LOG_EVERY_S:
            self._last_logged = now
            log.warning(
                "shared state (Redis) %s failed: %s: %s; serving on this replica's own state",
                operation,
                type(exc).__name__,
                exc,
            )

    async def close(self) -> None:
        if self._subscriber is not None:
            self._subscriber.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._subscriber
        for task in list(self._background):
            with contextlib.suppress(Exception):
                await task
        await self.redis.aclose()
