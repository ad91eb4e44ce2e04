"""The prefix index of cache_aware: the C kernel is built, and it behaves as its Python fallback."""

from __future__ import annotations

import logging
import random
from collections.abc import Callable

import pytest
from xxhash import xxh3_64_intdigest

from kiban.config import CacheAwarePolicy
from kiban.gateway import prefix_affinity, prefix_scan
from kiban.gateway.prefix_scan import BOUNDARIES, PythonPrefixIndex, prompt_keys

Index = PythonPrefixIndex  # either implementation: the kernel's type stub has the same methods
KINDS: dict[str, Callable[[int], Index]] = {
    "kernel": prefix_scan.PrefixIndex,
    "python": PythonPrefixIndex,
}
#: prompt lengths at, just under and just over the boundaries, and between them
LENGTHS = sorted({0, 100, *(b + d for b in BOUNDARIES[:8] for d in (-1, 0, 1, 97))})


def _body(rng: random.Random, prompt_bytes: int, key: bytes = b'"messages"') -> bytes:
    head = b'{"model":"m%d",' % rng.randrange(1000)
    prompt = key + bytes(rng.randrange(32, 127) for _ in range(prompt_bytes))
    return head + prompt[:prompt_bytes]


def _state(index: Index) -> tuple[list[int], list[int], int, int]:
    keys = index.keys()
    return keys, [index.held_by(k) for k in keys], len(index), index.evictions


def test_the_kernel_is_built_here() -> None:
    # make bootstrap installs a C compiler and libxxhash-dev: the tests run what kiban serves
    assert prefix_scan.NATIVE, "kiban.gateway._prefix_scan was not built (see setup.py)"
    assert prefix_scan.PrefixIndex is not PythonPrefixIndex


def test_a_key_is_the_xxh3_of_the_prompt_prefix() -> None:
    body = _body(random.Random(1), 5000)
    start = body.find(b'"messages"')
    sizes = [b for b in BOUNDARIES if b <= len(body) - start]
    expected = [xxh3_64_intdigest(body[start : start + size]) for size in sizes]
    assert prompt_keys(body) == expected
    assert len(expected) == 6  # 512 768 1152 1728 2592 3888
    for kind in KINDS.values():
        index = kind(100)
        assert index.record(body, 1)
        assert index.keys() == expected  # the longest most recent


@pytest.mark.parametrize("kind", KINDS)
def test_the_prompt_is_found_from_messages_else_prompt(kind: str) -> None:
    index = KINDS[kind](100)
    for key in (b'"messages"', b'"prompt"', b'"input"'):
        body = _body(random.Random(2), 600, key)
        assert index.record(body, 1) is (key != b'"input"')
    both = b'{"prompt":"a","messages":"' + b"x" * 600 + b'"}'
    index = KINDS[kind](100)
    index.record(both, 1)
    assert index.keys() == [xxh3_64_intdigest(both[14 : 14 + 512])]


@pytest.mark.parametrize("kind", KINDS)
def test_a_prompt_under_512_bytes_has_no_prefix(kind: str) -> None:
    index = KINDS[kind](100)
    body = _body(random.Random(5), 511)
    assert index.find(body, 0.0) == -1
    assert index.find_shorter() == -1
    assert index.find(b"{}", 0.0) == -1
    assert index.record(body, 1) is False
    with pytest.raises(ValueError, match="miss without a prompt found"):
        index.miss(1)
    assert len(index) == 0 and prompt_keys(body) == []


@pytest.mark.parametrize("kind", KINDS)
def test_find_looks_up_the_longest_prefix_first_down_to_min_match(kind: str) -> None:
    body = _body(random.Random(6), 5000)  # prefixes 512 .. 3888 of a 5,000-byte prompt
    keys = prompt_keys(body)
    index = KINDS[kind](100)
    assert index.find(body, 0.0) == 0  # nothing known
    index.miss(1)
    assert index.keys() == keys and index.held_by(keys[0]) == 1
    other = KINDS[kind](100)
    other.record(body[: body.find(b'"messages"') + 1000], 2)  # only the 512 and 768 prefixes
    assert other.find(body, 0.1) == 2  # the 768 one, found after four misses
    assert other.find(body, 0.2) == 0  # 768 bytes cover under 20% of 5,000
    other.find(body, 0.1)
    other.hit(4)  # the found prefix and the four longer ones, the longest most recent
    assert other.keys() == [keys[0], *keys[1:]] and other.held_by(keys[1]) == 6
    assert other.held_by(keys[0]) == 2  # shorter than the one found: not refreshed


@pytest.mark.parametrize("kind", KINDS)
def test_find_shorter_passes_over_a_prefix_whose_engines_cannot_take_it(kind: str) -> None:
    body = _body(random.Random(7), 3000)
    keys = prompt_keys(body)  # 512 768 1152 1728 2592
    index = KINDS[kind](100)
    index.record(body, 1)
    index.find(body, 0.0)
    index.hit(2)  # only the longest is now also held by engine 2
    assert index.find(body, 0.0) == 3
    assert index.find_shorter() == 1
    index.miss(4)  # the rest, then the ones found, the longest most recent
    assert index.keys() == keys and all(index.held_by(k) & 4 for k in keys)


@pytest.mark.parametrize("kind", KINDS)
def test_the_least_recently_used_keys_are_evicted_and_counted(kind: str) -> None:
    index = KINDS[kind](4)
    bodies = [_body(random.Random(n), 1000) for n in range(3)]  # two prefixes each
    for body in bodies:
        index.record(body, 1)
    assert len(index) == 4 and index.evictions == 2
    assert index.keys() == prompt_keys(bodies[1]) + prompt_keys(bodies[2])
    index.record(bodies[1], 2)  # refreshed, not evicted
    index.record(bodies[0], 1)
    assert index.keys() == prompt_keys(bodies[1]) + prompt_keys(bodies[0])
    assert index.evictions == 4


def test_kernel_and_fallback_behave_the_same() -> None:
    """Random finds, hits, misses and records over prompts sharing prefixes, with evictions."""
    rng = random.Random(8)
    base = _body(rng, 12_000)
    bodies = [base[: rng.choice(LENGTHS) + 30] for _ in range(40)]
    bodies += [_body(rng, length) for length in LENGTHS]
    for capacity in (1, 7, 64, 5000):
        kernel, python = prefix_scan.PrefixIndex(capacity), PythonPrefixIndex(capacity)
        for step in range(1500):
            body, bit = rng.choice(bodies), 1 << rng.randrange(64)
            if rng.random() < 0.2:
                assert kernel.record(body, bit) == python.record(body, bit)
                continue
            min_match = rng.choice((0.0, 0.2, 0.6, 1.0))
            held = kernel.find(body, min_match)
            assert held == python.find(body, min_match), (capacity, step)
            while held > 0 and rng.random() < 0.5:
                held = kernel.find_shorter()
                assert held == python.find_shorter(), (capacity, step)
            if held > 0:
                kernel.hit(bit)
                python.hit(bit)
            elif held == 0:
                kernel.miss(bit)
                python.miss(bit)
        assert _state(kernel) == _state(python), capacity
        assert len(kernel) == min(capacity, len(kernel.keys()))


def test_the_index_grows_to_its_capacity_and_no_further() -> None:
    rng = random.Random(9)
    index = prefix_scan.PrefixIndex(3000)
    bodies = [_body(rng, 5000) for _ in range(600)]  # 3,600 keys
    for body in bodies:
        index.record(body, 1)
    assert len(index) == 3000 and index.evictions == 600
    recent = bodies[-500:]
    assert index.keys() == [k for body in recent for k in prompt_keys(body)]
    assert all(index.find(body, 0.0) == 1 for body in recent)


@pytest.mark.parametrize("capacity", [0, 1 << 31])
@pytest.mark.parametrize("kind", KINDS)
def test_a_capacity_out_of_range_is_refused(kind: str, capacity: int) -> None:
    with pytest.raises(ValueError, match=f"capacity {capacity} is outside 1 to 1073741824"):
        KINDS[kind](capacity)


def test_without_the_kernel_a_cache_aware_route_warns_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(prefix_affinity, "NATIVE", False)
    prefix_affinity.warn_without_kernel.cache_clear()
    caplog.set_level(logging.WARNING, "kiban.gateway.prefix_affinity")
    for _ in range(2):
        prefix_affinity.CacheAware(CacheAwarePolicy(), [], list)
    assert [r.getMessage() for r in caplog.records] == [prefix_affinity.WITHOUT_KERNEL]
