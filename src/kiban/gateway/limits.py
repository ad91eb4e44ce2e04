"""Per-key rate limits: requests and tokens per minute, as token buckets.

Each limited key has two buckets that refill continuously (``limit / 60``
per second, up to ``limit``). A request is admitted when the request bucket
holds one request and the token bucket is not in debt and holds the
request's up-front estimate (capped at the bucket's size); both are then
taken. When the engine's usage is known the token bucket is settled by the
difference, so it may go into debt: later requests of that key wait until it
has refilled. Nothing here runs for a key without limits.

The buckets live in a store: :class:`LocalLimitStore` in the process, or
:class:`kiban.gateway.shared.RedisState` shared by every replica.
"""

from __future__ import annotations

import time
from typing import Any, Protocol

from kiban.config import RateLimits

#: bytes of request body per prompt token, for the up-front estimate (errs on the high side)
BYTES_PER_TOKEN = 4


class LimitStore(Protocol):
    """Where the buckets live."""

    async def admit(self, bucket: str, limits: RateLimits, tokens: int) -> tuple[float, str]:
        """Take one request and *tokens*: ``(0.0, "")`` when admitted, else the seconds until
        it would be and the limit (``requests_per_minute`` or ``tokens_per_minute``)."""
        ...

    async def settle(self, bucket: str, limits: RateLimits, tokens: int) -> None:
        """Take *tokens* more from the token bucket (give back when negative)."""
        ...


def prompt_estimate(body_size: int) -> int:
    """Prompt tokens guessed from the request body's size, before the engine counts them."""
    return body_size // BYTES_PER_TOKEN


def completion_cap(payload: dict[str, Any]) -> int:
    """The request's ``max_completion_tokens`` / ``max_tokens``, 0 when it sets neither."""
    most = payload.get("max_completion_tokens") or payload.get("max_tokens")
    return most if type(most) is int and most > 0 else 0


def tokens_used(
    usage: dict[str, Any] | None, streamed_events: int, prompt: int, status: int, reserved: int
) -> int:
    """Tokens to charge once a request is over.

    The engine's usage when it reported one; for a stream without usage, one
    token per streamed event plus the prompt estimate; nothing for a request
    no engine answered successfully; otherwise what was reserved up front.
    """
    if usage:
        total = usage.get("total_tokens")
        if type(total) is int:
            return total
        p, c = usage.get("prompt_tokens"), usage.get("completion_tokens")
        if type(p) is int and type(c) is int:
            return p + c
    if streamed_events:
        return streamed_events + prompt
    if status == 0 or status >= 400:
        return 0
    return reserved


class _Buckets:
    __slots__ = ("at", "requests", "tokens")

    def __init__(self, limits: RateLimits, now: float) -> None:
        self.requests = float(limits.requests_per_minute or 0)
        self.tokens = float(limits.tokens_per_minute or 0)
        self.at = now

    def refill(self, limits: RateLimits, now: float) -> None:
        elapsed = now - self.at
        self.at = now
        if limits.requests_per_minute:
            rpm = limits.requests_per_minute
            self.requests = min(rpm, self.requests + elapsed * rpm / 60)
        if limits.tokens_per_minute:
            tpm = limits.tokens_per_minute
            self.tokens = min(tpm, self.tokens + elapsed * tpm / 60)


def wait_for(
    limits: RateLimits, requests: float, tokens: float, want_tokens: int
) -> tuple[float, str]:
    """Seconds until a request may pass given the buckets' levels, and the limit that holds it."""
    wait, which = 0.0, ""
    rpm, tpm = limits.requests_per_minute, limits.tokens_per_minute
    if rpm and requests < 1.0:
        wait, which = (1.0 - requests) * 60 / rpm, "requests_per_minute"
    if tpm:
        need = max(1.0, min(float(want_tokens), float(tpm)))
        if tokens < need:
            token_wait = (need - tokens) * 60 / tpm
            if token_wait > wait:
                wait, which = token_wait, "tokens_per_minute"
    return wait, which


class LocalLimitStore:
    """The buckets of this process: a dict lookup and a little float arithmetic per request."""

    shared = False

    def __init__(self) -> None:
        self._buckets: dict[str, _Buckets] = {}

    async def admit(self, bucket: str, limits: RateLimits, tokens: int) -> tuple[float, str]:
        return self.admit_now(bucket, limits, tokens)

    def admit_now(self, bucket: str, limits: RateLimits, tokens: int) -> tuple[float, str]:
        now = time.monotonic()
        state = self._buckets.get(bucket)
        if state is None:
            state = self._buckets[bucket] = _Buckets(limits, now)
        else:
            state.refill(limits, now)
        wait, which = wait_for(limits, state.requests, state.tokens, tokens)
        if wait > 0:
            return wait, which
        if limits.requests_per_minute:
            state.requests -= 1.0
        if limits.tokens_per_minute:
            state.tokens -= tokens
        return 0.0, ""

    async def settle(self, bucket: str, limits: RateLimits, tokens: int) -> None:
        state = self._buckets.get(bucket)
        if state is not None and limits.tokens_per_minute and tokens:
            state.tokens = min(float(limits.tokens_per_minute), state.tokens - tokens)

    async def close(self) -> None:
        self._buckets.clear()
