"""Driving the load: a closed loop of N clients, or an open loop of Poisson arrivals.

Closed loop: each client owns one connection and sends its next request as
soon as the previous one ends; latency runs from the moment it is sent.
Open loop: arrivals are drawn from an exponential distribution at the given
rate, independent of the answers; a request waits for a free connection
(up to ``max_connections``) and its latency runs from its scheduled arrival,
so a server that falls behind shows it in the latency (no coordinated omission).

A run ends when the request count or the duration is reached, whichever
comes first; requests in flight then are completed (each bounded by its
timeout) and counted.
"""

from __future__ import annotations

import asyncio
import random
from collections import deque
from dataclasses import dataclass
from time import perf_counter, process_time

import orjson

from kiban.bench.connection import CONNECT, Connection, StaleConnection
from kiban.bench.recorder import Recorder
from kiban.bench.workload import Workload

_CONNECT_TIMEOUT_S = 10.0
_EARLY_WAKE_S = 0.001  # sleep until this long before an arrival: timers have 1 ms resolution


@dataclass(frozen=True)
class LoadShape:
    """How much load, and for how long."""

    concurrency: int = 8  # closed loop: clients (one connection each)
    rate: float | None = None  # open loop: mean arrivals per second
    max_connections: int = 1024  # open loop: cap on connections (requests beyond wait)
    requests: int | None = 1000
    duration_s: float | None = None
    warmup: int = 0  # requests sent first and not counted
    timeout_s: float = 600.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.requests is None and self.duration_s is None:
            raise ValueError("give a request count, a duration, or both")
        if self.concurrency < 1 or self.max_connections < 1:
            raise ValueError("concurrency and max_connections must be at least 1")
        if self.rate is not None and self.rate <= 0:
            raise ValueError("the rate must be above 0 requests per second")

    @property
    def open_loop(self) -> bool:
        return self.rate is not None


class LoadRunner:
    """Runs one :class:`Workload` under one :class:`LoadShape`; ``await run()``."""

    def __init__(self, workload: Workload, shape: LoadShape) -> None:
        self.workload = workload
        self.shape = shape
        self._requests = workload.raw_requests()
        self._next_request = 0
        self.recorder = Recorder()
        self.current = self.recorder  # the recorder of the phase running now
        self.warming_up = False
        self._issued = 0
        self._limit: int | None = None
        self._deadline = float("inf")
        self._stopping = False
        self._connections: set[Connection] = set()

    # -- public ------------------------------------------------------------------------------

    async def discover_model(self) -> str:
        """The first model the server lists at ``GET .../v1/models``."""
        target = self.workload.target
        conn = await Connection.open(target.host, target.port, target.tls(), _CONNECT_TIMEOUT_S)
        try:
            await conn.request(self.workload.models_request(), False, _CONNECT_TIMEOUT_S)
        finally:
            conn.close()
        if conn.error is not None:
            raise RuntimeError(
                f"GET {target.models_path} failed ({conn.error}): "
                f"{conn.error_sample.decode('utf-8', 'replace')}"
            )
        try:
            models = orjson.loads(b"".join(conn.body))["data"]
            return str(models[0]["id"])
        except (orjson.JSONDecodeError, KeyError, IndexError, TypeError):
            raise RuntimeError(f"GET {target.models_path} listed no model") from None

    async def run(self) -> Recorder:
        """Warm up (if asked), then measure; returns the recorder of the measured part."""
        try:
            if self.shape.warmup:
                self.warming_up = True
                await self._phase(Recorder(), self.shape.warmup, None)
                self.warming_up = False
            if not self._stopping:
                await self._phase(self.recorder, self.shape.requests, self.shape.duration_s)
        finally:
            for conn in list(self._connections):
                conn.close()
        return self.recorder

    def stop(self) -> None:
        """Send no new request; the ones in flight finish. A second call aborts them."""
        if self._stopping:
            for conn in list(self._connections):
                if conn.transport is not None:
                    conn.transport.abort()
        self._stopping = True

    @property
    def stopped(self) -> bool:
        """Whether :meth:`stop` ended the run early."""
        return self._stopping

    # -- phases ------------------------------------------------------------------------------

    async def _phase(self, recorder: Recorder, limit: int | None, duration_s: float | None) -> None:
        self.current = recorder
        self._issued = 0
        self._limit = limit
        self._deadline = float("inf")
        conns: list[Connection | None] = []
        if not self.shape.open_loop:
            conns = await self._open_many(min(self.shape.concurrency, limit or 1 << 30))
        cpu = process_time()
        recorder.started = perf_counter()
        if duration_s:
            self._deadline = recorder.started + duration_s
        if self.shape.open_loop:
            await self._open_loop(recorder)
        else:
            await asyncio.gather(*(self._client(recorder, c) for c in conns))
        recorder.client_cpu_s = process_time() - cpu

    def _take(self) -> bool:
        """May another request be sent? Counts it when so."""
        if self._stopping or (self._limit is not None and self._issued >= self._limit):
            return False
        if self._deadline != float("inf") and perf_counter() >= self._deadline:
            return False
        self._issued += 1
        return True

    def _raw(self) -> bytes:
        raw = self._requests[self._next_request]
        self._next_request = (self._next_request + 1) % len(self._requests)
        return raw

    # -- connections -------------------------------------------------------------------------

    async def _connect(self) -> Connection:
        target = self.workload.target
        conn = await Connection.open(target.host, target.port, target.tls(), _CONNECT_TIMEOUT_S)
        self._connections.add(conn)
        return conn

    async def _open_many(self, count: int) -> list[Connection | None]:
        async def one() -> Connection | None:
            try:
                return await self._connect()
            except (OSError, TimeoutError):
                return None  # the client retries, and reports the error, when it sends

        return list(await asyncio.gather(*(one() for _ in range(count))))

    def _discard(self, conn: Connection) -> None:
        conn.close()
        self._connections.discard(conn)

    async def _send(self, recorder: Recorder, conn: Connection | None, due: float) -> Connection:
        """One request on *conn* (a new connection when None or worn out); returns the
        connection to use next (possibly closed). Every outcome is recorded."""
        stream, timeout_s = self.workload.stream, self.shape.timeout_s
        raw = self._raw()
        for _ in range(2):  # a second try only when a kept-alive connection went stale
            if conn is None or not conn.usable:
                if conn is not None:
                    self._discard(conn)
                try:
                    conn = await self._connect()
                except (OSError, TimeoutError) as exc:
                    recorder.last_finished = perf_counter()
                    recorder.error(CONNECT, f"{type(exc).__name__}: {exc}")
                    return _CLOSED
            try:
                await conn.request(raw, stream, timeout_s)
            except StaleConnection:
                continue
            recorder.record(conn, due, stream)
            return conn
        recorder.error("disconnected", "the server closed two connections before answering")
        return _CLOSED

    async def _client(self, recorder: Recorder, conn: Connection | None) -> None:
        while self._take():
            conn = await self._send(recorder, conn, perf_counter())
            if conn is _CLOSED:
                conn = None
        if conn is not None:
            self._discard(conn)

    async def _open_loop(self, recorder: Recorder) -> None:
        rate = self.shape.rate
        assert rate is not None
        rng = random.Random(self.shape.seed)
        pool = _Pool(self.shape.max_connections)
        tasks: set[asyncio.Task[None]] = set()
        due = perf_counter()

        async def arrival(scheduled: float) -> None:
            conn = await pool.acquire()
            # a request sent before its time (timer slack) counts from when it was sent
            conn = await self._send(recorder, conn, min(scheduled, perf_counter()))
            pool.release(None if conn is _CLOSED else conn)

        while True:
            due += rng.expovariate(rate)
            wait = due - perf_counter()
            if wait > _EARLY_WAKE_S:
                await asyncio.sleep(wait - _EARLY_WAKE_S)
            else:
                await asyncio.sleep(0)
            if not self._take():
                break
            task = asyncio.ensure_future(arrival(due))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.gather(*tasks)
        for conn in pool.idle:
            self._discard(conn)


_CLOSED: Connection = Connection()  # marker: the request's connection is gone


class _Pool:
    """Connections of the open loop: idle ones are reused; at most *size* exist."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.slots = 0
        self.idle: list[Connection] = []
        self.waiters: deque[asyncio.Future[Connection | None]] = deque()

    async def acquire(self) -> Connection | None:
        """An idle connection, or None: a free slot whose holder connects."""
        if self.idle:
            return self.idle.pop()
        if self.slots < self.size:
            self.slots += 1
            return None
        waiter: asyncio.Future[Connection | None] = asyncio.get_running_loop().create_future()
        self.waiters.append(waiter)
        return await waiter

    def release(self, conn: Connection | None) -> None:
        """Give back a connection, or (None) the slot of one that closed."""
        if conn is not None and not conn.usable:
            conn = None
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(conn)
                return
        if conn is not None:
            self.idle.append(conn)
        else:
            self.slots -= 1
