"""The prefix index of ``cache_aware``: the C kernel when built, else the same in Python.

A prompt is the raw request body from its ``"messages"`` key on (else ``"prompt"``),
not parsed again. It is cut at 512 bytes, then at boundaries growing by half (a 5 KB
prompt gives 6 prefixes, 1 MB gives 19); a prefix's key is its 64-bit xxh3 hash. The
index maps keys to the engines that were sent them (a bitmask, bit *i* for the route's
*i*-th engine), an LRU of at most ``capacity`` keys.

setup.py compiles ``_prefix_scan`` (Cython; xxh3 from Debian's ``libxxhash-dev``) when a
C compiler and that header are there; without them kiban installs anyway and runs
PythonPrefixIndex, which behaves the same (``NATIVE`` says which runs; ``kiban serve``
warns when a cache_aware route runs without the kernel). A hit on a 4 KB prompt (find,
then hit) takes 0.34 µs in a warm loop with the kernel, 1.5 µs in Python; in the gateway
cache_aware adds about 4 µs a request with the kernel, 10 without (docs/routing.md).
"""

from __future__ import annotations

from bisect import bisect_right
from collections import OrderedDict

from xxhash import xxh3_64_intdigest

__all__ = ["BOUNDARIES", "NATIVE", "PrefixIndex", "PythonPrefixIndex", "prompt_keys"]

FIRST_BOUNDARY = 512


def _boundaries(limit: int = 1 << 40) -> tuple[int, ...]:
    """Prefix lengths: 512, then each half as long again as the one before."""
    out = [FIRST_BOUNDARY]
    while out[-1] < limit:
        out.append(out[-1] + out[-1] // 2)
    return tuple(out)


BOUNDARIES = _boundaries()
_MESSAGES, _PROMPT = b'"messages"', b'"prompt"'


def _prompt_at(body: bytes) -> int:
    """Offset of the prompt's key in *body* (messages, else prompt), -1 without one."""
    at = body.find(_MESSAGES)
    return at if at >= 0 else body.find(_PROMPT)


def _sizes(length: int) -> tuple[int, ...]:
    """The prefix lengths of a prompt of *length* bytes, shortest first."""
    return BOUNDARIES[: bisect_right(BOUNDARIES, length)]


def prompt_keys(body: bytes) -> list[int]:
    """Keys of the prompt's prefixes in *body*, shortest first; none without a prompt."""
    start = _prompt_at(body)
    if start < 0:
        return []
    view = memoryview(body)
    return [xxh3_64_intdigest(view[start : start + n]) for n in _sizes(len(body) - start)]


class PythonPrefixIndex:
    """The prefix index of one cache_aware route: which engines were sent which prefixes.

    A lookup is a sequence: find (the longest known prefix), find_shorter while its
    engines cannot take the request, then hit (an engine holding it took it) or miss (no
    known prefix; an engine took it); record stands alone (the balance guard decided).
    One instance per route, used from one thread.
    """

    def __init__(self, capacity: int) -> None:
        if not 1 <= capacity <= 1 << 30:
            raise ValueError(f"capacity {capacity} is outside 1 to {1 << 30}")
        self.capacity = capacity
        self.evictions = 0  # keys dropped as least recently used
        self._index: OrderedDict[int, int] = OrderedDict()
        self._body = b""
        self._start = -1
        self._need = 0.0
        self._sizes: tuple[int, ...] = ()
        self._next_cut = -1  # the next prefix to hash, counting down; -1: none left
        self._found: list[int] = []  # keys computed, longest first

    def __len__(self) -> int:
        return len(self._index)

    def find(self, body: bytes, min_match: float) -> int:
        """The engines holding the prompt's longest known prefix that covers *min_match*
        of the prompt: a mask, 0 when none is known, -1 without a prompt of 512 bytes."""
        start = _prompt_at(body)
        self._found = []
        if start < 0 or len(body) - start < FIRST_BOUNDARY:
            self._start, self._next_cut, self._body = -1, -1, b""
            return -1
        self._body, self._start = body, start
        self._need = min_match * (len(body) - start)
        self._sizes = _sizes(len(body) - start)
        self._next_cut = len(self._sizes) - 1
        return self._next_held()

    def find_shorter(self) -> int:
        """Like find, for the longest known prefix shorter than the last one found."""
        return -1 if self._start < 0 else self._next_held()

    def hit(self, bit: int) -> None:
        """Record *bit*'s engine for the prefix found and the longer ones hashed on the way
        (the found one first, the longest most recent); the shorter ones age in the LRU."""
        for key in reversed(self._found):
            self._record(key, bit)
        self._body, self._start = b"", -1

    def miss(self, bit: int) -> None:
        """Record *bit*'s engine for every prefix of the prompt found, the longest most recent."""
        if self._start < 0:
            raise ValueError("miss without a prompt found")
        view, start = memoryview(self._body), self._start
        for size in self._sizes[: self._next_cut + 1]:  # those not hashed yet, shortest first
            self._record(xxh3_64_intdigest(view[start : start + size]), bit)
        self.hit(bit)

    def record(self, body: bytes, bit: int) -> bool:
        """Record *bit*'s engine for every prefix of *body*'s prompt; False without one."""
        keys = prompt_keys(body)
        for key in keys:
            self._record(key, bit)
        return bool(keys)

    def held_by(self, key: int) -> int:
        """The mask of the engines recorded for *key*, 0 when it is not in the index."""
        return self._index.get(key, 0)

    def keys(self) -> list[int]:
        """The keys, least recently used first."""
        return list(self._index)

    def _next_held(self) -> int:
        view, start, sizes = memoryview(self._body), self._start, self._sizes
        while self._next_cut >= 0 and sizes[self._next_cut] >= self._need:
            key = xxh3_64_intdigest(view[start : start + sizes[self._next_cut]])
            self._next_cut -= 1
            self._found.append(key)
            held = self._index.get(key)
            if held is not None:
                return held
        return 0

    def _record(self, key: int, bit: int) -> None:
        index = self._index
        held = index.get(key)
        if held is not None:
            index[key] = held | bit
            index.move_to_end(key)
            return
        if len(index) >= self.capacity:  # full: the least recently used one goes
            index.popitem(last=False)
            self.evictions += 1
        index[key] = bit


try:
    from kiban.gateway._prefix_scan import PrefixIndex

    NATIVE = True
except ImportError:  # installed without a C compiler or xxhash.h: the same results, slower
    PrefixIndex = PythonPrefixIndex  # type: ignore[misc,assignment]
    NATIVE = False
