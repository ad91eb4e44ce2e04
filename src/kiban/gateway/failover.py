"""Where the attempts of one request go after a failure: the route's failover policy.

A failed attempt is a :class:`Failure`, named by its ``reason``. What follows it
(``routes[].failover``, ``routes[].retries``; docs/reliability.md has the table):

- ``context_length``: the engine refused the prompt as too long for its context. The
  request moves on and never comes back to that engine; with ``larger`` the engines
  whose configured context is larger go first, those known to be no larger last.
- ``connect``, ``broken`` (before anything reached the client) and ``status`` (5xx,
  429): the same engine is tried again up to ``same_engine_retries`` times while its
  circuit allows, after a backoff with jitter, or after the engine's ``Retry-After``
  when that ends before the request's deadline (else the request moves on at once).
- ``timeout`` and ``malformed``: move on (waiting again on an engine that did not answer
  costs twice; an engine that sent broken bytes is not trusted with the same request).
- an engine appears once in the order; ``retries.attempts`` bounds all attempts.

The route's retry budget and the structured-output path (kiban/gateway/structured_attempts.py)
are the proxy's; this module only orders and paces.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from kiban.structured.verify import OutputFailure

if TYPE_CHECKING:
    from kiban.config import FailoverPolicy, Retries
    from kiban.gateway.targets import Target

#: failures after which the same engine may be tried again
SAME_ENGINE_REASONS = frozenset({"connect", "broken", "status"})


@dataclass(slots=True)
class Failure:
    """An attempt that failed before anything was sent to the client.

    ``reason``: ``connect``, ``timeout``, ``status`` (5xx or 429), ``broken`` (the
    connection dropped), ``malformed`` (invalid JSON or SSE), ``context_length``,
    ``invalid_output`` or ``rejected``.
    """

    reason: str
    message: str
    status: int = 0
    body: bytes = b""
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    output: OutputFailure | None = None  # why a structured output failed verification
    retry_after: bytes | None = None  # the engine's Retry-After header

    @property
    def engine_answered(self) -> bool:
        """The engine worked; the output or the request was the problem (no breaker trip,
        no draw on the retry budget)."""
        return self.reason in ("invalid_output", "rejected", "context_length")


def retry_after_s(value: bytes | None) -> float | None:
    """Seconds of a ``Retry-After: N`` header (an HTTP date is not honoured: None)."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None
    return seconds if 0 <= seconds < 86400 else None


class FailoverPlan:
    """The targets of one plain request, in order; told each failure by :meth:`record`."""

    def __init__(
        self,
        targets: list[Target],
        policy: FailoverPolicy,
        retries: Retries,
        deadline: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.queue = list(targets)
        self.policy = policy
        self.max_tries = retries.attempts
        self.backoff_s = retries.backoff_s
        self.deadline = deadline
        self.clock = clock
        self.tries = 0
        self.again: Target | None = None  # the engine to try once more, next
        self.wait_s = 0.0  # the pause before the next attempt
        self._same: dict[str, int] = {}  # same-engine retries so far, by engine

    def __iter__(self) -> Iterator[Target]:
        while self.tries < self.max_tries:
            if self.again is not None:
                target, self.again = self.again, None
            elif self.queue:
                target = self.queue.pop(0)
            else:
                return
            self.tries += 1
            yield target

    def record(self, target: Target, failure: Failure) -> None:
        """Note how the attempt on *target* failed; sets the next target and the pause."""
        self.again = None
        self.wait_s = self.backoff_s * (0.5 + random.random()) * self.tries
        if failure.reason == "context_length":
            self.wait_s = 0.0
            if self.policy.context_length == "larger":
                self._larger_first(target.engine.config.planned_context)
            return
        if failure.reason not in SAME_ENGINE_REASONS:
            return
        engine = target.engine
        done = self._same.get(engine.name, 0)
        if done >= self.policy.same_engine_retries or not engine.breaker.allows(time.monotonic()):
            return
        wait = retry_after_s(failure.retry_after)
        if wait is None:
            wait = self.policy.same_engine_backoff_s * 2**done * (0.5 + random.random())
        if self.clock() + wait >= self.deadline:
            return  # the engine asks for longer than the request has: move on
        self._same[engine.name] = done + 1
        self.again, self.wait_s = target, wait

    def _larger_first(self, refused_at: int | None) -> None:
        """Engines with a larger context first, then unknown ones, then no larger."""
        if refused_at is None:
            return

        def rank(t: Target) -> int:
            context = t.engine.config.planned_context
            return 1 if context is None else 0 if context > refused_at else 2

        self.queue.sort(key=rank)  # stable: the route's order within each group
