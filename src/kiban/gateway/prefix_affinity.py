"""``strategy: cache_aware``: send a prompt to the engine that holds its longest prefix.

Each route keeps an approximate prefix index over the prompt's prefix keys
(kiban.gateway.prefix_scan, in C: cuts of the raw body from its ``"messages"`` key
on, at 512 bytes and then at boundaries growing by half, each hashed with xxh3). The
index is an LRU of ``max_prefixes`` keys; each key holds the engines that were sent it.

Keys are computed longest first and only as far as needed: a prompt whose
longest prefixes are known (the next turn of a chat) costs one or two hashes;
a prompt recorded in full (a miss, or the guard deciding) costs one per cut,
about three times its bytes hashed (xxh3 with SSE2: 0.7 instructions a byte).

While the route is balanced, the least-loaded engine holding the longest
prefix that covers ``min_match`` of the prompt wins. When the busiest engine
has more than ``balance_abs`` requests in flight beyond the idlest and more
than ``balance_rel`` times as many, the least-outstanding engine takes the
request instead and the prefix is recorded there too, so a hot prefix spreads
over the engines rather than piling onto one (sgl-project/sglang#14305).
"""

from __future__ import annotations

import logging
from functools import cache

from kiban.config import CacheAwarePolicy
from kiban.gateway.engine_load import KV_AVOID
from kiban.gateway.engines import Circuit
from kiban.gateway.prefix_scan import NATIVE, PrefixIndex
from kiban.gateway.targets import Order, RequestView, Target

log = logging.getLogger(__name__)
WITHOUT_KERNEL = (
    "cache_aware runs without its C kernel (kiban.gateway._prefix_scan was not built: install "
    "a C compiler and libxxhash-dev, then reinstall kiban); each request costs about 6 µs more"
)


@cache
def warn_without_kernel() -> None:
    """Say once per process that the Python fallback of the prefix kernel runs."""
    log.warning(WITHOUT_KERNEL)


def load_of(target: Target) -> int:
    """Requests in flight from this gateway plus the engine's own load penalty, if scraped."""
    engine = target.engine
    return engine.outstanding + engine.load_penalty


_HIT, _MISS, _GUARD, _NO_PREFIX = range(4)  # indexes of CacheAware.OUTCOMES
_CLOSED = Circuit.CLOSED  # an enum member read from the class costs ~900 instructions on 3.11


class CacheAware:
    """The cache_aware strategy of one route (one instance per route and process).

    Its index maps a prefix key to a bitmask of the route's engines that were
    sent that prefix (each target's ``bit``).
    """

    OUTCOMES = ("hit", "miss", "guard", "no_prefix")  # decisions[i] counts OUTCOMES[i]

    def __init__(self, policy: CacheAwarePolicy, targets: list[Target], fallback: Order) -> None:
        if not NATIVE:
            warn_without_kernel()
        self.fallback = fallback
        self._targets = list(targets)
        self.index = PrefixIndex(policy.max_prefixes)
        # counted here, published to Prometheus by Metrics (an inc costs ten times as much)
        self.decisions = [0] * len(self.OUTCOMES)
        # the policy's numbers as plain attributes: read on every request
        self._min_match = policy.min_match
        self._balance_abs = policy.balance_abs
        self._balance_rel = policy.balance_rel

    def order(self, targets: list[Target], request: RequestView) -> list[Target]:
        ordered = self.fallback(targets)
        if len(ordered) < 2:
            return ordered
        body = request.body
        idlest, busiest = ordered[0].engine, ordered[-1].engine
        low = idlest.outstanding + idlest.load_penalty  # load_of, inlined (a call: ~500 instr.)
        high = busiest.outstanding + busiest.load_penalty
        index = self.index
        if high - low > self._balance_abs and high > self._balance_rel * low:
            recorded = index.record(body, ordered[0].bit)  # none under 512 bytes
            self.decisions[_GUARD if recorded else _NO_PREFIX] += 1
            return ordered
        # longest first, down to the shortest prefix that covers min_match of the prompt
        holders = index.find(body, self._min_match)
        while holders > 0:  # the least-loaded usable holder wins
            position = 0  # counted by hand: enumerate costs ~700 instructions more
            for target in ordered:  # least outstanding first
                if holders & target.bit:
                    engine = target.engine
                    if engine.breaker.state is _CLOSED and engine.load_penalty < KV_AVOID:
                        self.decisions[_HIT] += 1
                        index.hit(target.bit)
                        if position:  # the fallback's list is its own (a sorted copy)
                            ordered.insert(0, ordered.pop(position))
                        return ordered
                position += 1  # noqa: SIM113
            holders = index.find_shorter()
        if holders < 0:
            self.decisions[_NO_PREFIX] += 1
        else:
            self.decisions[_MISS] += 1
            index.miss(ordered[0].bit)
        return ordered

    @property
    def evictions(self) -> int:
        """Prefix keys dropped from the index as least recently used."""
        return self.index.evictions

    def holders(self, key: int) -> list[str]:
        """Names of the engines recorded for a prefix key (for tests and inspection)."""
        mask = self.index.held_by(key)
        return [t.engine.name for t in self._targets if mask & t.bit]
