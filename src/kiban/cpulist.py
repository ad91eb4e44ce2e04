"""CPU core lists: Linux's cpulist form (``0-3,8``) and an even split of cores among engines.

A CPU engine that pins its compute threads (vLLM's CPU build binds its OpenMP threads to
fixed cores, the same cores for every server when left to itself) must be given cores of
its own when several run on one host, or they all compute on the same core.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence


def parse_cpu_list(text: str) -> tuple[int, ...]:
    """``"0-3,8"`` -> ``(0, 1, 2, 3, 8)``; ValueError naming the part that is not a core list."""
    cores: list[int] = []
    for part in text.split(","):
        first, dash, last = part.strip().partition("-")
        try:
            lo = int(first)
            hi = int(last) if dash else lo
        except ValueError:
            raise ValueError(f"{part.strip()!r} is not a core number or range like 0-3") from None
        if lo < 0 or hi < lo:
            raise ValueError(f"{part.strip()!r} is not a range of core numbers (low-high, >= 0)")
        cores.extend(range(lo, hi + 1))
    if len(set(cores)) != len(cores):
        raise ValueError(f"{text!r} names a core twice")
    return tuple(sorted(cores))


def format_cpu_list(cores: Iterable[int]) -> str:
    """``(0, 1, 2, 3, 8)`` -> ``"0-3,8"``."""
    ordered = sorted(set(cores))
    parts: list[str] = []
    start = prev = None
    for core in [*ordered, None]:
        if prev is not None and core == prev + 1:
            prev = core
            continue
        if start is not None:
            parts.append(str(start) if start == prev else f"{start}-{prev}")
        start = prev = core
    return ",".join(parts)


def usable_cores() -> tuple[int, ...]:
    """The cores this process may run on (its affinity mask)."""
    return tuple(sorted(os.sched_getaffinity(0)))


def split_cores(
    engines: Sequence[str], fixed: dict[str, tuple[int, ...]], available: Sequence[int]
) -> tuple[dict[str, tuple[int, ...]], list[str]]:
    """Cores for each of *engines*: *fixed* ones keep theirs, the others split the rest evenly.

    Returns the assignment and warnings (engines that have to share a core).
    """
    taken = {core for cores in fixed.values() for core in cores}
    free = [c for c in available if c not in taken] or list(available)
    rest = [name for name in engines if name not in fixed]
    out = {name: fixed[name] for name in engines if name in fixed}
    warnings: list[str] = []
    if not rest:
        return out, warnings
    if len(free) < len(rest):
        for i, name in enumerate(rest):
            out[name] = (free[i % len(free)],)
        warnings.append(
            f"{len(rest)} CPU engines that pin their threads share {len(free)} core(s) "
            f"({format_cpu_list(free)}): set launch.cpus to place them yourself"
        )
        return out, warnings
    per, extra = divmod(len(free), len(rest))
    start = 0
    for i, name in enumerate(rest):
        size = per + (1 if i < extra else 0)
        out[name] = tuple(free[start : start + size])
        start += size
    return out, warnings
