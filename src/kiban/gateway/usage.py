"""Usage per API key: counted in memory on the request path, written to a store later.

Each finished request adds its key's requests, prompt and completion tokens
to a dict cell of (key name, hour) and to the key's Prometheus series; a
background task hands the cells to the store (:mod:`kiban.gateway.usage_store`)
every ``flush_s``. When the store is slow or down the batch goes back into
memory and is written on a later flush, so no request is lost from the counts;
the failure is counted in ``kiban_usage_store_errors_total`` and logged.

Token counts are the engine's usage. A stream is asked for it (see
:mod:`kiban.gateway.stream_usage`); a response that still has none is counted
by estimate: the prompt from the body's size, one completion token per event.

The per-key series are private (``kiban_key_*``): they appear on
``/admin/metrics`` (an admin key) and never on the public ``/metrics``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter

from kiban.gateway.periodic import Periodic
from kiban.gateway.usage_store import Batch, UsageRow, UsageStore, hour_of

if TYPE_CHECKING:
    from kiban.gateway.proxy import Exchange

log = logging.getLogger("kiban.usage")

#: key names with their own series; further names share the series of OTHER_KEYS
MAX_KEY_SERIES = 500
OTHER_KEYS = "_other"
_LOG_EVERY_S = 60.0
#: how long usage stays in memory when there is no store (keys from the environment only)
KEPT_WITHOUT_STORE_S = 86400.0


class KeyMetrics:
    """Prometheus series per key name, at most :data:`MAX_KEY_SERIES` names."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "kiban_key_requests",
            "Requests by API key name and status class (2xx, 4xx, 5xx)",
            ["key", "status"],
            registry=registry,
        )
        self.tokens = Counter(
            "kiban_key_tokens",
            "Tokens by API key name and type (prompt, completion)",
            ["key", "type"],
            registry=registry,
        )
        self.rejections = Counter(
            "kiban_key_rate_limit_rejections",
            "Requests refused with 429 by the key's own limits, by key name and limit",
            ["key", "limit"],
            registry=registry,
        )
        self._children: dict[str, tuple[Any, Any, dict[str, Any]]] = {}

    def _name(self, key: str) -> str:
        """*key*, or OTHER_KEYS once MAX_KEY_SERIES names have series."""
        if key in self._children or len(self._children) < MAX_KEY_SERIES:
            return key
        return OTHER_KEYS

    def _of(self, key: str) -> tuple[Any, Any, dict[str, Any]]:
        found = self._children.get(key)
        if found is None:
            key = self._name(key)
            found = self._children.get(key)
            if found is None:
                found = self._children[key] = (
                    self.tokens.labels(key, "prompt"),
                    self.tokens.labels(key, "completion"),
                    {},
                )
        return found

    def observe(self, key: str, status: int, prompt: int, completion: int) -> None:
        prompt_child, completion_child, by_status = self._of(key)
        status_class = f"{status // 100}xx"
        child = by_status.get(status_class)
        if child is None:
            child = by_status[status_class] = self.requests.labels(self._name(key), status_class)
        child.inc()
        if prompt:
            prompt_child.inc(prompt)
        if completion:
            completion_child.inc(completion)

    def rejected(self, key: str, limit: str) -> None:
        self.rejections.labels(self._name(key), limit).inc()

    def prepare(self, keys: Iterable[str]) -> None:
        """Series of the configured keys at zero, so increases count from the first request."""
        for key in keys:
            _, _, by_status = self._of(key)
            if "2xx" not in by_status:
                by_status["2xx"] = self.requests.labels(self._name(key), "2xx")


def tokens_of(ex: Exchange, prompt_guess: int) -> tuple[int, int]:
    """Prompt and completion tokens of a finished request: the engine's, else an estimate."""
    usage = ex.usage
    if usage:
        prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
        return (
            prompt if type(prompt) is int else 0,
            completion if type(completion) is int else 0,
        )
    if ex.status == 200 and ex.stream:
        return prompt_guess, ex.chunks
    return 0, 0


class Usage:
    """This process's usage per key: series at once, rows in the store every *flush_s*."""

    def __init__(self, registry: CollectorRegistry, flush_s: float = 10.0) -> None:
        self.metrics = KeyMetrics(registry)
        self.store_errors = Counter(
            "kiban_usage_store_errors",
            "Flushes of usage per key that the store (SQLite or Redis) refused; kept for the next",
            registry=registry,
        )
        self.store: UsageStore | None = None
        self.flush_s = flush_s
        self._pending: Batch = {}
        self._flushing = Periodic(self.flush_s, self._flush)
        self._last_logged = 0.0

    # -- hot path ----------------------------------------------------------------------------

    def record(self, key: str, ex: Exchange, prompt_guess: int) -> None:
        """Count one finished request of *key*."""
        prompt, completion = tokens_of(ex, prompt_guess)
        self.metrics.observe(key, ex.status, prompt, completion)
        cell_key = (key, hour_of(time.time()))
        cell = self._pending.get(cell_key)
        if cell is None:
            cell = self._pending[cell_key] = [0, 0, 0]
        cell[0] += 1
        cell[1] += prompt
        cell[2] += completion

    def rejected(self, key: str, limit: str) -> None:
        self.metrics.rejected(key, limit)

    # -- the store ---------------------------------------------------------------------------

    def start(self, store: UsageStore | None) -> None:
        self.store = store
        self._flushing.start()

    async def _flush(self) -> None:
        await self.flush()

    async def flush(self) -> bool:
        """Write what was counted since the last flush; on failure keep it for the next.

        Without a store the cells of the last :data:`KEPT_WITHOUT_STORE_S` stay (the console's).
        """
        if self.store is None:
            first = hour_of(time.time() - KEPT_WITHOUT_STORE_S)
            self._pending = {k: v for k, v in self._pending.items() if k[1] >= first}
            return True
        if not self._pending:
            return True
        batch, self._pending = self._pending, {}
        try:
            await self.store.add(batch)
        except Exception as exc:
            self._put_back(batch)
            self.store_errors.inc()
            now = time.monotonic()
            if now - self._last_logged >= _LOG_EVERY_S:
                self._last_logged = now
                log.warning(
                    "usage store failed: %s: %s; %d key-hours kept in memory for the next flush",
                    type(exc).__name__,
                    exc,
                    len(self._pending),
                )
            return False
        return True

    def _put_back(self, batch: Batch) -> None:
        for cell_key, counts in batch.items():
            cell = self._pending.setdefault(cell_key, [0, 0, 0])
            for i, value in enumerate(counts):
                cell[i] += value

    async def rows(self, since: float, key: str | None = None) -> list[UsageRow]:
        """The store's rows plus what this process has not written yet."""
        stored: list[UsageRow] = []
        if self.store is not None:
            with contextlib.suppress(Exception):
                stored = await self.store.rows(since, key)
        first = hour_of(since)
        pending = [
            UsageRow(name, hour, *counts)
            for (name, hour), counts in self._pending.items()
            if hour >= first and (key is None or name == key)
        ]
        return stored + pending

    async def close(self, timeout_s: float = 5.0) -> None:
        """Stop flushing, then write what is left (reported if the store cannot take it)."""
        await self._flushing.stop()
        if self.store is None:
            return
        written = False
        with contextlib.suppress(TimeoutError):
            written = await asyncio.wait_for(self.flush(), timeout_s)
        if not written and self._pending:
            requests = sum(c[0] for c in self._pending.values())
            log.error("usage store unavailable at shutdown: %d requests not written", requests)
        await self.store.close()
