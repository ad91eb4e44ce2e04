"""``strategy: cache_aware``: send a prompt to the engine that holds its longest prefix.

Each route keeps an approximate prefix index over the raw request body from
its ``"messages"`` (or ``"prompt"``) key on, without parsing it again: the
prompt is cut at 512 bytes, then at boundaries growing by half (a 5 KB prompt
gives 6 prefixes, 1 MB gives 19), and each prefix's key is a hash chained over
the segments, so one pass over the bytes gives every key. The index is an LRU
of ``max_prefixes`` keys; each key lists the engines that were sent it.

While the route is balanced, the least-loaded engine holding the longest
prefix that covers ``min_match`` of the prompt wins. When the busiest engine
has more than ``balance_abs`` requests in flight beyond the idlest and more
than ``balance_rel`` times as many, the least-outstanding engine takes the
request instead and the prefix is recorded there too, so a hot prefix spreads
over the engines rather than piling onto one (sgl-project/sglang#14305).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

from kiban.config import CacheAwarePolicy
from kiban.gateway.engine_load import KV_AVOID
from kiban.gateway.engines import Circuit
from kiban.gateway.targets import Order, RequestView, Target


def load_of(target: Target) -> int:
    """Requests in flight from this gateway plus the engine's own load penalty, if scraped."""
    engine = target.engine
    return engine.outstanding + engine.load_penalty


FIRST_BOUNDARY = 512
_PROMPT_KEYS = (b'"messages"', b'"prompt"')


def _boundaries(limit: int = 1 << 40) -> tuple[int, ...]:
    """Prefix lengths: 512, then each half as long again as the one before."""
    out = [FIRST_BOUNDARY]
    while out[-1] < limit:
        out.append(out[-1] + out[-1] // 2)
    return tuple(out)


BOUNDARIES = _boundaries()


def prompt_start(body: bytes) -> int:
    """Offset of the prompt's key in *body* (messages, else prompt), -1 without one."""
    for key in _PROMPT_KEYS:
        at = body.find(key)
        if at >= 0:
            return at
    return -1


def prefix_keys(body: bytes, start: int) -> list[int]:
    """Keys of the prompt's prefixes from *start*, shortest first (none under 512 bytes)."""
    keys: list[int] = []
    length = len(body) - start
    h = 0
    prev = start
    for size in BOUNDARIES:
        if size > length:
            break
        end = start + size
        h = hash((h, body[prev:end]))  # chained: equal keys mean equal prefixes
        keys.append(h)
        prev = end
    return keys


def _noop() -> None:
    return None


class CacheAware:
    """The cache_aware strategy of one route (one instance per route and process).

    The index maps a prefix key to a bitmask of the route's engines that were
    sent that prefix (bit *i* for the route's *i*-th target).
    """

    OUTCOMES = ("hit", "miss", "guard", "no_prefix")

    def __init__(self, policy: CacheAwarePolicy, targets: list[Target], fallback: Order) -> None:
        self.policy = policy
        self.fallback = fallback
        self._targets = list(targets)
        self.bits = {id(t): 1 << i for i, t in enumerate(targets)}
        self.index: OrderedDict[int, int] = OrderedDict()
        self.decided: dict[str, Callable[[], None]] = dict.fromkeys(self.OUTCOMES, _noop)
        self.evicted: Callable[[], None] = _noop

    def __call__(self, targets: list[Target], request: RequestView) -> list[Target]:
        ordered = self.fallback(targets)
        if len(ordered) < 2:
            return ordered
        body = request.body
        start = prompt_start(body)
        keys = prefix_keys(body, start) if start >= 0 else []
        if not keys:
            self.decided["no_prefix"]()
            return ordered
        policy = self.policy
        busiest, idlest = load_of(ordered[-1]), load_of(ordered[0])
        if busiest - idlest > policy.balance_abs and busiest > policy.balance_rel * idlest:
            self.decided["guard"]()
            self._record(keys, self.bits[id(ordered[0])])
            return ordered
        chosen, matched = self._longest_match(ordered, keys, len(body) - start)
        if chosen is None:
            self.decided["miss"]()
            self._record(keys, self.bits[id(ordered[0])])
            return ordered
        self.decided["hit"]()
        # the matched prefix and the longer ones; the shorter ones age in the LRU, as they
        # only serve prompts that part from this one earlier
        self._record(keys[matched:], self.bits[id(chosen)])
        if chosen is ordered[0]:
            return ordered
        return [chosen, *(t for t in ordered if t is not chosen)]

    def _longest_match(
        self, ordered: list[Target], keys: list[int], length: int
    ) -> tuple[Target | None, int]:
        """The least-loaded closed-circuit engine holding the longest prefix long enough,
        and that prefix's position in *keys*."""
        index = self.index
        bits = self.bits
        need = self.policy.min_match * length
        for i in range(len(keys) - 1, -1, -1):
            if BOUNDARIES[i] < need:
                break
            holders = index.get(keys[i])
            if holders is None:
                continue
            for target in ordered:  # least outstanding first
                if not holders & bits[id(target)]:
                    continue
                engine = target.engine
                if engine.breaker.state is Circuit.CLOSED and engine.load_penalty < KV_AVOID:
                    return target, i
        return None, 0

    def holders(self, key: int) -> list[str]:
        """Names of the engines recorded for a prefix key (for tests and inspection)."""
        mask = self.index.get(key, 0)
        return [t.engine.name for t in self._targets if mask & self.bits[id(t)]]

    def _record(self, keys: list[int], bit: int) -> None:
        index = self.index
        pop = index.pop
        for key in keys:
            index[key] = pop(key, 0) | bit  # re-inserted: most recently used
        overflow = len(index) - self.policy.max_prefixes
        for _ in range(overflow):
            index.popitem(last=False)
            self.evicted()
