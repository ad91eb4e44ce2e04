"""Background load for tests that kill or restart engines under traffic.

``background_load`` is the one way tests run requests in the background: its
workers stop when the block ends (also when an assertion or an exception ends
it), after ``max_requests`` calls in all, or after ``max_seconds``, whichever
comes first. Failures are counted, and only the first few are kept, so a broken
gateway can never make the test process grow.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

KEPT_FAILURES = 10
PAUSE_AFTER_FAILURE_S = 0.05


@dataclass
class Load:
    """What the workers did: results in completion order, failures counted by type."""

    max_requests: int
    deadline: float
    results: list[Any] = field(default_factory=list)
    failures: list[BaseException] = field(default_factory=list)
    failure_count: int = 0
    failure_types: Counter[str] = field(default_factory=Counter)
    join_timeout_s: float = 120.0
    stop: threading.Event = field(default_factory=threading.Event)
    threads: list[threading.Thread] = field(default_factory=list)
    _issued: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def run_out(self) -> None:
        """Wait for the workers to reach the request or time bound by themselves."""
        self._join(self.deadline - time.monotonic() + self.join_timeout_s)

    def _join(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for thread in self.threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        stuck = [t.name for t in self.threads if t.is_alive()]
        assert not stuck, f"load workers still running after {timeout:.0f} s: {stuck}"

    def _take_ticket(self) -> bool:
        with self._lock:
            if self.stop.is_set() or self._issued >= self.max_requests:
                return False
            if time.monotonic() >= self.deadline:
                return False
            self._issued += 1
            return True

    def _failed(self, exc: BaseException) -> None:
        with self._lock:
            self.failure_count += 1
            self.failure_types[type(exc).__name__] += 1
            if len(self.failures) < KEPT_FAILURES:
                self.failures.append(exc)

    def describe_failures(self) -> str:
        """For assertion messages: counts by type and the first failures kept."""
        return f"{self.failure_count} failed {dict(self.failure_types)}: {self.failures!r}"


def _work(load: Load, call: Callable[[], Any]) -> None:
    while load._take_ticket():
        try:
            load.results.append(call())
        except Exception as exc:
            load._failed(exc)
            load.stop.wait(PAUSE_AFTER_FAILURE_S)


@contextmanager
def background_load(
    call: Callable[[], Any],
    *,
    workers: int,
    max_requests: int,
    max_seconds: float,
    join_timeout_s: float = 120.0,
) -> Iterator[Load]:
    """Run *call* in a loop on *workers* threads for the duration of the block.

    The block may read ``load.results`` while it runs, or wait for the bounds with
    ``load.run_out()``; after it the workers are stopped and joined (within
    *join_timeout_s*, which must exceed one call's own timeout), whatever happened
    inside it.
    """
    load = Load(
        max_requests=max_requests,
        deadline=time.monotonic() + max_seconds,
        join_timeout_s=join_timeout_s,
    )
    load.threads = [
        threading.Thread(target=_work, args=(load, call), name=f"load-{i}", daemon=True)
        for i in range(workers)
    ]
    for thread in load.threads:
        thread.start()
    try:
        yield load
    finally:
        load.stop.set()
        load._join(join_timeout_s)
