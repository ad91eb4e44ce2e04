"""Where the attempts of one structured request go, and when to stop.

The engines of the route that can take the request are ranked by what they enforce
(the whole constraint first, then fewer features left to kiban, then engines that
only accept the form). Each attempt goes to the best-ranked engine still usable:

- an invalid answer counts against ``structured.retries``; with ``retry_on: next`` the
  retry rotates among the best-ranked engines, with ``same`` it stays on the engine;
  after an answer cut off at ``max_tokens`` every later attempt bounds its strings, and
  after one cut off inside a number, its numbers too;
- an engine that refuses the schema is asked again with less of it enforced
  (:data:`RELAX_STEPS`) before it counts as failed;
- an engine that fails otherwise (connection, timeout, 5xx) is not tried again;
- a deterministic request (temperature 0) is never sent twice unchanged to one engine:
  it would get the same answer;
- no attempt starts after the route's total timeout since the request arrived.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Protocol

from kiban.config import StructuredPolicy
from kiban.gateway.targets import Target
from kiban.structured.verify import OutputFailure

#: how many times an engine that refuses the schema is asked again with less of it
RELAX_STEPS = 2
#: output failures after which later attempts bound their strings
RUNAWAYS = frozenset({"truncated", "whitespace_runaway"})


class Attempted(Protocol):
    """What an attempt plan reads and sets of its request (a ``StructuredRequest``)."""

    policy: StructuredPolicy
    deterministic: bool
    bounded: bool
    integers: bool

    def rank(self, target: Target) -> int: ...

    def relax_further(self, engine: str) -> bool: ...

    def sent_before(self, target: Target) -> bool: ...


class AttemptPlan:
    """An iterator of targets for one structured request; told each failure by `record`."""

    def __init__(
        self,
        request: Attempted,
        targets: list[Target],
        attempts: int,
        deadline: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.request = request
        self.targets = targets  # ranked, best first
        self.max_outputs = 1 + request.policy.retries
        self.max_tries = max(attempts, self.max_outputs) + RELAX_STEPS
        self.deadline = deadline
        self.clock = clock
        self.tries = 0
        self.outputs = 0  # attempts that ended in an invalid answer
        self.failed: set[str] = set()  # engines not to try again
        self.last: Target | None = None
        self.again: Target | None = None  # an engine to ask again at once (it refused)

    def __iter__(self) -> Iterator[Target]:
        while (target := self._next()) is not None:
            self.tries += 1
            self.last = target
            yield target

    def record(self, engine: str, reason: str, output: OutputFailure | None) -> bool:
        """Note how an attempt on *engine* failed; False when no further attempt may follow."""
        if reason == "invalid_output":
            self.outputs += 1
            if output is not None and output.kind in RUNAWAYS:
                self.request.bounded = True
                self.request.integers |= output.runaway == "number"
        elif reason == "rejected" and self.request.relax_further(engine):
            self.again = self.last
        else:
            self.failed.add(engine)
        return self.outputs < self.max_outputs

    def _next(self) -> Target | None:
        if self.tries >= self.max_tries or self.outputs >= self.max_outputs:
            return None
        if self.tries and self.clock() >= self.deadline:
            return None
        if self.again is not None:
            target, self.again = self.again, None
            return target
        usable = [t for t in self.targets if t.engine.name not in self.failed]
        if self.request.deterministic:
            usable = [t for t in usable if not self.request.sent_before(t)]
        if not usable:
            return None
        last = self.last
        if last is not None and last in usable and self.request.policy.retry_on == "same":
            return last
        best = self.request.rank(usable[0])
        group = [t for t in usable if self.request.rank(t) == best]
        if last is not None and last in group and len(group) > 1:
            return group[(group.index(last) + 1) % len(group)]
        return group[0]
