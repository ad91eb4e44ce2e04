"""``strategy: session``: requests with one session key stick to one engine.

The key comes from a header (default ``X-Session-ID``), or the request's
``user`` or ``prompt_cache_key`` field, as the route configures. Engines sit
on a consistent-hash ring (160 points each; CRC-32 with a finaliser, the same
in every process and every gateway replica), with bounded load: an engine
takes a session only while it has fewer than
``max(ceil(load_factor * (in_flight + 1) / engines), min_bound)`` requests in
flight. A session whose engine is unhealthy, open or full moves to the next
engine on the ring, and comes back once its engine can take it. Requests
without a key go to the least-outstanding engine.
"""

from __future__ import annotations

import bisect
import math
import zlib

from kiban.config import SessionPolicy
from kiban.gateway.targets import Order, RequestView, Target

POINTS_PER_ENGINE = 160
_STICKY, _MOVED, _NO_KEY = range(3)  # indexes of SessionAffinity.OUTCOMES


def ring_hash(data: bytes) -> int:
    """CRC-32 spread by murmur3's 32-bit finaliser (CRC alone clusters similar keys)."""
    h = zlib.crc32(data)
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & 0xFFFFFFFF
    return h ^ (h >> 16)


class Ring:
    """Engines on a hash ring; ``orders[position(key)]``: every engine in ring order from a key."""

    def __init__(self, engines: list[str]) -> None:
        points = sorted(
            (ring_hash(f"{name}#{i}".encode()), name)
            for name in engines
            for i in range(POINTS_PER_ENGINE)
        )
        self.points = [p for p, _ in points]
        names = [n for _, n in points]
        distinct = len(set(engines))
        # for every point, the engines in the order met walking clockwise from it
        self.orders: list[tuple[str, ...]] = []
        for i in range(len(names)):
            seen: dict[str, None] = {}
            j = i
            while len(seen) < distinct:
                seen.setdefault(names[j % len(names)])
                j += 1
            self.orders.append(tuple(seen))

    def position(self, key: bytes) -> int:
        """Index of the first point at or after the key's hash, clockwise."""
        return bisect.bisect_left(self.points, ring_hash(key)) % len(self.points)


class SessionAffinity:
    """The session strategy of one route (one instance per route and process)."""

    OUTCOMES = ("sticky", "moved", "no_key")  # decisions[i] counts OUTCOMES[i]

    def __init__(self, policy: SessionPolicy, targets: list[Target], fallback: Order) -> None:
        self.policy = policy
        self.fallback = fallback
        self.ring = Ring([t.engine.name for t in targets])
        by_name = {t.engine.name: t for t in targets}
        self._orders = [tuple(by_name[n] for n in order) for order in self.ring.orders]
        self.header = policy.header.lower().encode("latin-1")
        self.decisions = [0] * len(self.OUTCOMES)  # published to Prometheus by Metrics

    def key_of(self, request: RequestView) -> bytes | None:
        """The request's session key, None without one."""
        if self.policy.key == "header":
            header = self.header
            for name, value in request.client_headers:
                if name == header:
                    return value or None
            return None
        field = request.payload.get(self.policy.key)
        if isinstance(field, str) and field:
            return field.encode()
        return None

    def order(self, targets: list[Target], request: RequestView) -> list[Target]:
        key = self.key_of(request)
        if key is None or len(targets) < 2:
            if key is None:
                self.decisions[_NO_KEY] += 1
            return self.fallback(targets)
        usable = {id(t) for t in targets}
        in_flight = sum(t.engine.outstanding for t in targets)
        policy = self.policy
        bound = max(
            math.ceil(policy.load_factor * (in_flight + 1) / len(targets)), policy.min_bound
        )
        owners = self._orders[self.ring.position(key)]
        ordered = [t for t in owners if id(t) in usable]
        for i, target in enumerate(ordered):
            if target.engine.outstanding < bound:
                if target is owners[0]:
                    self.decisions[_STICKY] += 1
                    return ordered
                self.decisions[_MOVED] += 1
                return [target, *ordered[:i], *ordered[i + 1 :]]
        self.decisions[_MOVED] += 1
        return self.fallback(targets)
