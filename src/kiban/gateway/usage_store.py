"""Where usage per API key is kept across restarts: SQLite beside the keys file, or Redis.

Both stores hold one row per (key name, hour): requests, prompt tokens,
completion tokens. The gateway adds batches to them (:mod:`kiban.gateway.usage`
counts in memory and flushes); ``kiban keys usage`` and the console read them.
Several workers or replicas add into the same rows, so their counts sum.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

HOUR_S = 3600

#: (key name, hour start as a Unix time) -> [requests, prompt tokens, completion tokens]
Batch = dict[tuple[str, int], list[int]]


@dataclass(frozen=True, slots=True)
class UsageRow:
    """One key's usage in one hour."""

    key: str
    hour: int  # start of the hour, Unix seconds (UTC)
    requests: int
    prompt_tokens: int
    completion_tokens: int


class UsageStore(Protocol):
    """Adds batches and reads rows back."""

    async def add(self, batch: Batch) -> None: ...

    async def rows(self, since: float, key: str | None = None) -> list[UsageRow]: ...

    async def close(self) -> None: ...


def usage_path(keys_file: Path) -> Path:
    """The SQLite file that keeps the usage of the keys of *keys_file*."""
    return keys_file.with_name(keys_file.name + ".usage.sqlite")


def hour_of(now: float) -> int:
    return int(now // HOUR_S) * HOUR_S


_SCHEMA = """
CREATE TABLE IF NOT EXISTS usage (
    key TEXT NOT NULL,
    hour INTEGER NOT NULL,
    requests INTEGER NOT NULL DEFAULT 0,
    prompt_tokens INTEGER NOT NULL DEFAULT 0,
    completion_tokens INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (key, hour)
)
"""
_UPSERT = """
INSERT INTO usage (key, hour, requests, prompt_tokens, completion_tokens) VALUES (?, ?, ?, ?, ?)
ON CONFLICT (key, hour) DO UPDATE SET
    requests = requests + excluded.requests,
    prompt_tokens = prompt_tokens + excluded.prompt_tokens,
    completion_tokens = completion_tokens + excluded.completion_tokens
"""


class SqliteUsage:
    """Usage rows in one SQLite file (WAL, so readers never wait for the writer).

    Synchronous: the gateway calls it from a thread (:class:`SqliteUsageStore`),
    the CLI directly.
    """

    def __init__(self, path: Path, timeout_s: float = 5.0) -> None:
        self.path = path
        self.timeout_s = timeout_s

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=self.timeout_s)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(_SCHEMA)
        return db

    def add(self, batch: Batch) -> None:
        rows = [(key, hour, *counts) for (key, hour), counts in batch.items()]
        db = self._connect()
        try:
            with db:
                db.executemany(_UPSERT, rows)
        finally:
            db.close()

    def rows(self, since: float, key: str | None = None) -> list[UsageRow]:
        if not self.path.exists():
            return []
        db = self._connect()
        try:
            sql = "SELECT key, hour, requests, prompt_tokens, completion_tokens FROM usage"
            sql += " WHERE hour >= ?" + (" AND key = ?" if key is not None else "")
            args: tuple[Any, ...] = (hour_of(since),) + ((key,) if key is not None else ())
            return [UsageRow(*row) for row in db.execute(sql + " ORDER BY hour, key", args)]
        finally:
            db.close()


class SqliteUsageStore:
    """:class:`SqliteUsage` off the event loop."""

    def __init__(self, path: Path) -> None:
        self.db = SqliteUsage(path)

    async def add(self, batch: Batch) -> None:
        await asyncio.to_thread(self.db.add, batch)

    async def rows(self, since: float, key: str | None = None) -> list[UsageRow]:
        return await asyncio.to_thread(self.db.rows, since, key)

    async def close(self) -> None:
        return None


_FIELDS = ("requests", "prompt_tokens", "completion_tokens")


class RedisUsageStore:
    """Usage rows in Redis, one hash per hour (``<prefix>:usage:<hour>``, field ``key|field``).

    Hashes expire after *keep_days*; every replica increments the same fields.
    """

    def __init__(self, redis: Any, prefix: str, keep_days: int = 400) -> None:
        self.redis = redis
        self.prefix = prefix
        self.keep_s = keep_days * 86400

    def _hash(self, hour: int) -> str:
        return f"{self.prefix}:usage:{hour}"

    async def add(self, batch: Batch) -> None:
        pipe = self.redis.pipeline(transaction=False)
        hours = set()
        for (key, hour), counts in batch.items():
            hours.add(hour)
            for name, value in zip(_FIELDS, counts, strict=True):
                if value:
                    pipe.hincrby(self._hash(hour), f"{key}|{name}", value)
        for hour in hours:
            pipe.expire(self._hash(hour), self.keep_s)
        await pipe.execute()

    async def rows(self, since: float, key: str | None = None) -> list[UsageRow]:
        hours = list(range(hour_of(since), hour_of(time.time()) + HOUR_S, HOUR_S))
        pipe = self.redis.pipeline(transaction=False)
        for hour in hours:
            pipe.hgetall(self._hash(hour))
        found: list[UsageRow] = []
        for hour, fields in zip(hours, await pipe.execute(), strict=True):
            found += _rows_of(hour, fields.items(), key)
        return found

    async def close(self) -> None:
        return None


def _rows_of(hour: int, fields: Iterable[tuple[Any, Any]], only: str | None) -> list[UsageRow]:
    per_key: dict[str, dict[str, int]] = {}
    for field, value in fields:
        name, _, what = (field.decode() if isinstance(field, bytes) else field).rpartition("|")
        if only is None or name == only:
            per_key.setdefault(name, {})[what] = int(value)
    return [
        UsageRow(name, hour, *(counts.get(f, 0) for f in _FIELDS))
        for name, counts in sorted(per_key.items())
    ]


def totals(rows: Iterable[UsageRow]) -> dict[str, list[int]]:
    """Requests, prompt and completion tokens summed per key."""
    summed: dict[str, list[int]] = {}
    for row in rows:
        cell = summed.setdefault(row.key, [0, 0, 0])
        cell[0] += row.requests
        cell[1] += row.prompt_tokens
        cell[2] += row.completion_tokens
    return summed
