"""Prefix keys of a prompt for ``cache_aware``: the C kernel when built, else the same in Python.

The prompt is the raw request body from its ``"messages"`` key on (else ``"prompt"``),
not parsed again. It is cut at 512 bytes, then at boundaries growing by half (a 5 KB
prompt gives 6 prefixes, 1 MB gives 19); a prefix's key is its 64-bit xxh3 hash.

setup.py compiles ``_prefix_scan`` (Cython, xxh3 inlined from Debian's ``libxxhash-dev``)
when a C compiler and that header are there; without them kiban installs anyway and runs
the functions below, which give the same results (``NATIVE`` says which runs; ``kiban
serve`` warns when a cache_aware route runs without the kernel). On the hit path of a 4 KB
prompt the kernel costs about 3,300 instructions (1,320 of them xxh3, with AVX2); these, 14,000.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Mapping

from xxhash import xxh3_64_intdigest

__all__ = ["BOUNDARIES", "NATIVE", "longest_known", "prefix_keys", "prompt_at"]

FIRST_BOUNDARY = 512


def _boundaries(limit: int = 1 << 40) -> tuple[int, ...]:
    """Prefix lengths: 512, then each half as long again as the one before."""
    out = [FIRST_BOUNDARY]
    while out[-1] < limit:
        out.append(out[-1] + out[-1] // 2)
    return tuple(out)


BOUNDARIES = _boundaries()
_MESSAGES, _PROMPT = b'"messages"', b'"prompt"'


def python_prompt_at(body: bytes) -> int:
    """Offset of the prompt's key in *body* (messages, else prompt), -1 without one."""
    at = body.find(_MESSAGES)
    return at if at >= 0 else body.find(_PROMPT)


def python_prefix_keys(body: bytes, start: int, skip: int = 0) -> list[int]:
    """Keys of the prompt's prefixes from *start*, shortest first, but for the *skip* longest."""
    if not 0 <= start <= len(body):
        raise ValueError(f"start {start} is outside a {len(body)}-byte body")
    view = memoryview(body)
    sizes = _sizes(len(body) - start)
    sizes = sizes[: max(len(sizes) - skip, 0)]
    return [xxh3_64_intdigest(view[start : start + size]) for size in sizes]


def python_longest_known(
    index: Mapping[int, int], body: bytes, min_match: float, skip: int = 0
) -> tuple[int, list[int], int | None]:
    """Look the prompt's prefixes up in *index*, longest first, to the first one known.

    Only prefixes covering *min_match* of the prompt count; the *skip* longest are passed
    over. Returns the prompt's offset (-1 without a prompt of 512 bytes), the keys
    computed (longest first) and the value *index* holds for the last of them, None when
    it holds none of them.
    """
    start = python_prompt_at(body)
    if start < 0 or len(body) - start < FIRST_BOUNDARY:
        return -1, [], None
    view = memoryview(body)
    length = len(body) - start
    sizes = _sizes(length)
    need = min_match * length
    keys: list[int] = []
    for size in reversed(sizes[: max(len(sizes) - skip, 0)]):
        if size < need:
            break
        key = xxh3_64_intdigest(view[start : start + size])
        keys.append(key)
        held = index.get(key)
        if held is not None:
            return start, keys, held
    return start, keys, None


def _sizes(length: int) -> tuple[int, ...]:
    """The prefix lengths of a prompt of *length* bytes, shortest first."""
    return BOUNDARIES[: bisect_right(BOUNDARIES, length)]


try:
    from kiban.gateway._prefix_scan import longest_known, prefix_keys, prompt_at
except ImportError:  # installed without a C compiler or xxhash.h: the same results, slower
    longest_known, prefix_keys, prompt_at = (
        python_longest_known,
        python_prefix_keys,
        python_prompt_at,
    )

NATIVE = longest_known is not python_longest_known
