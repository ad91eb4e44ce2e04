"""``strategy: cache_aware``: send a prompt to the engine that holds its longest prefix.

Each route keeps an approximate prefix index over the raw request body from
its ``"messages"`` (or ``"prompt"``) key on, without parsing it again: the
prompt is cut at 512 bytes, then at boundaries growing by half (a 5 KB prompt
gives 6 prefixes, 1 MB gives 19), and each prefix's key is its 64-bit xxh3
hash. The index is an LRU of ``max_prefixes`` keys; each key lists the engines
that were sent it.

Keys are computed longest first and only as far as needed: a prompt whose
longest prefixes are known (the next turn of a chat) costs one or two hashes;
a prompt recorded in full (a miss, or the guard deciding) costs one per cut,
about three times its bytes hashed (xxh3 takes ~0.6 instructions a byte).

While the route is balanced, the least-loaded engine holding the longest
prefix that covers ``min_match`` of the prompt wins. When the busiest engine
has more than ``balance_abs`` requests in flight beyond the idlest and more
than ``balance_rel`` times as many, the least-outstanding engine takes the
request instead and the prefix is recorded there too, so a hot prefix spreads
over the engines rather than piling onto one (sgl-project/sglang#14305).
"""

from __future__ import annotations

from bisect import bisect_right
from collections import OrderedDict

from xxhash import xxh3_64_intdigest

from kiban.config import CacheAwarePolicy
from kiban.gateway.engine_load import KV_AVOID
from kiban.gateway.engines import Circuit
from kiban.gateway.targets import Order, RequestView, Target


def load_of(target: Target) -> int:
    """Requests in flight from this gateway plus the engine's own load penalty, if scraped."""
    engine = target.engine
    return engine.outstanding + engine.load_penalty


FIRST_BOUNDARY = 512
_MESSAGES, _PROMPT = b'"messages"', b'"prompt"'


def _boundaries(limit: int = 1 << 40) -> tuple[int, ...]:
    """Prefix lengths: 512, then each half as long again as the one before."""
    out = [FIRST_BOUNDARY]
    while out[-1] < limit:
        out.append(out[-1] + out[-1] // 2)
    return tuple(out)


BOUNDARIES = _boundaries()
#: for a prompt with n prefixes, their lengths longest first
_LONGEST_FIRST = tuple(BOUNDARIES[:n][::-1] for n in range(len(BOUNDARIES) + 1))


def prompt_start(body: bytes) -> int:
    """Offset of the prompt's key in *body* (messages, else prompt), -1 without one."""
    at = body.find(_MESSAGES)
    return at if at >= 0 else body.find(_PROMPT)


def prefix_keys(body: bytes, start: int) -> list[int]:
    """Keys of the prompt's prefixes from *start*, shortest first (none under 512 bytes)."""
    return _keys(memoryview(body), start, bisect_right(BOUNDARIES, len(body) - start))


def _keys(view: memoryview, start: int, count: int) -> list[int]:
    """Keys of the *count* shortest prefixes of the prompt at *start* in *view*."""
    return [xxh3_64_intdigest(view[start : start + size]) for size in BOUNDARIES[:count]]


_HIT, _MISS, _GUARD, _NO_PREFIX = range(4)  # indexes of CacheAware.OUTCOMES
_CLOSED = Circuit.CLOSED  # an enum member read from the class costs ~900 instructions on 3.11


class CacheAware:
    """The cache_aware strategy of one route (one instance per route and process).

    The index maps a prefix key to a bitmask of the route's engines that were
    sent that prefix (each target's ``bit``).
    """

    OUTCOMES = ("hit", "miss", "guard", "no_prefix")  # decisions[i] counts OUTCOMES[i]

    def __init__(self, policy: CacheAwarePolicy, targets: list[Target], fallback: Order) -> None:
        self.policy = policy
        self.fallback = fallback
        self._targets = list(targets)
        self.index: OrderedDict[int, int] = OrderedDict()
        # counted here, published to Prometheus by Metrics (an inc costs ten times as much)
        self.decisions = [0] * len(self.OUTCOMES)
        self.evictions = 0
        # the policy's numbers as plain attributes: read on every request
        self._min_match = policy.min_match
        self._balance_abs = policy.balance_abs
        self._balance_rel = policy.balance_rel

    def order(self, targets: list[Target], request: RequestView) -> list[Target]:
        ordered = self.fallback(targets)
        if len(ordered) < 2:
            return ordered
        body = request.body
        start = body.find(_MESSAGES)  # prompt_start, inlined (a call costs ~500 instructions)
        if start < 0:
            start = body.find(_PROMPT)
        length = len(body) - start
        if start < 0 or length < FIRST_BOUNDARY:
            self.decisions[_NO_PREFIX] += 1
            return ordered
        idlest, busiest = ordered[0].engine, ordered[-1].engine
        low = idlest.outstanding + idlest.load_penalty
        high = busiest.outstanding + busiest.load_penalty
        if high - low > self._balance_abs and high > self._balance_rel * low:
            self.decisions[_GUARD] += 1
            self._record(prefix_keys(body, start), ordered[0].bit)
            return ordered
        # longest first, down to the shortest prefix that covers min_match of the prompt
        index = self.index
        view = memoryview(body)
        need = self._min_match * length
        sizes = _LONGEST_FIRST[bisect_right(BOUNDARIES, length)]
        longer: list[int] = []  # the keys computed so far, longest first
        for size in sizes:
            if size < need:
                break
            key = xxh3_64_intdigest(view[start : start + size])
            holders = index.get(key)
            if holders is not None:
                position = 0  # counted by hand: enumerate costs ~700 instructions more
                for target in ordered:  # least outstanding first
                    if holders & target.bit:
                        engine = target.engine
                        if engine.breaker.state is _CLOSED and engine.load_penalty < KV_AVOID:
                            self.decisions[_HIT] += 1
                            # the matched prefix and the longer ones; the shorter ones age in
                            # the LRU, as they only serve prompts that part from this one earlier
                            if longer:
                                longer.reverse()
                                self._record([key, *longer], target.bit)  # longest most recent
                            else:
                                index.move_to_end(key)
                            if position:  # the fallback's list is its own (a sorted copy)
                                ordered.insert(0, ordered.pop(position))
                            return ordered
                    position += 1  # noqa: SIM113
            longer.append(key)
        self.decisions[_MISS] += 1
        shorter = _keys(view, start, len(sizes) - len(longer))  # those not computed yet
        longer.reverse()
        self._record(shorter + longer, ordered[0].bit)  # the longest most recent
        return ordered

    def holders(self, key: int) -> list[str]:
        """Names of the engines recorded for a prefix key (for tests and inspection)."""
        mask = self.index.get(key, 0)
        return [t.engine.name for t in self._targets if mask & t.bit]

    def _record(self, keys: list[int], bit: int) -> None:
        """Mark *bit*'s engine as holding *keys*, each now the most recently used."""
        index = self.index
        get, refresh = index.get, index.move_to_end
        for key in keys:
            holders = get(key)
            if holders is None:
                index[key] = bit
            else:
                refresh(key)
                if not holders & bit:
                    index[key] = holders | bit
        overflow = len(index) - self.policy.max_prefixes
        if overflow > 0:
            for _ in range(overflow):
                index.popitem(last=False)
            self.evictions += overflow
