"""The prefix-key kernel of cache_aware: built here, and the same results as its Python fallback."""

from __future__ import annotations

import logging
import random
from collections import OrderedDict

import pytest
from xxhash import xxh3_64_intdigest

from kiban.config import CacheAwarePolicy
from kiban.gateway import prefix_affinity, prefix_scan
from kiban.gateway.prefix_scan import BOUNDARIES

NATIVE = (prefix_scan.prompt_at, prefix_scan.prefix_keys, prefix_scan.longest_known)
PYTHON = (
    prefix_scan.python_prompt_at,
    prefix_scan.python_prefix_keys,
    prefix_scan.python_longest_known,
)
#: prompt lengths at, just under and just over the boundaries, and between them
LENGTHS = sorted({0, 100, *(b + d for b in BOUNDARIES[:8] for d in (-1, 0, 1, 97))})


def _body(rng: random.Random, prompt_bytes: int, key: bytes = b'"messages"') -> bytes:
    head = b'{"model":"m%d",' % rng.randrange(1000)
    prompt = key + bytes(rng.randrange(32, 127) for _ in range(prompt_bytes))
    return head + prompt[:prompt_bytes]


def test_the_kernel_is_built_here() -> None:
    # make bootstrap installs a C compiler and libxxhash-dev: the tests run what kiban serves
    assert prefix_scan.NATIVE, "kiban.gateway._prefix_scan was not built (see setup.py)"
    assert prefix_scan.longest_known is not prefix_scan.python_longest_known


def test_a_key_is_the_xxh3_of_the_prompt_prefix() -> None:
    body = _body(random.Random(1), 5000)
    start = body.find(b'"messages"')
    keys = prefix_scan.prefix_keys(body, start)
    sizes = [b for b in BOUNDARIES if b <= len(body) - start]
    assert keys == [xxh3_64_intdigest(body[start : start + size]) for size in sizes]
    assert len(keys) == 6  # 512 768 1152 1728 2592 3888


@pytest.mark.parametrize("key", [b'"messages"', b'"prompt"', b'"input"'])
def test_kernel_and_fallback_find_the_same_prompt(key: bytes) -> None:
    rng = random.Random(2)
    for length in (0, 5, 600):
        body = _body(rng, length + len(key), key)
        assert NATIVE[0](body) == PYTHON[0](body)
    assert NATIVE[0](b'{"prompt":"a","messages":[]}') == 1 + len('"prompt":"a",')


def test_kernel_and_fallback_give_the_same_keys() -> None:
    rng = random.Random(3)
    for length in LENGTHS:
        body = _body(rng, length)
        start = max(PYTHON[0](body), 0)
        for skip in (0, 1, 2, 30):
            assert NATIVE[1](body, start, skip) == PYTHON[1](body, start, skip), (length, skip)


def test_kernel_and_fallback_look_up_the_same_prefixes() -> None:
    rng = random.Random(4)
    for length in LENGTHS:
        body = _body(rng, length)
        start = max(PYTHON[0](body), 0)
        keys = PYTHON[1](body, start)
        index: OrderedDict[int, int] = OrderedDict((k, rng.randrange(1, 8)) for k in keys)
        for held in (set(), set(keys), set(rng.sample(keys, len(keys) // 2))):
            for key in list(index):
                if key not in held:
                    del index[key]
            for min_match in (0.0, 0.3, 1.0):
                for skip in (0, 1, 3):
                    native = NATIVE[2](index, body, min_match, skip)
                    assert native == PYTHON[2](index, body, min_match, skip), (length, skip)


def test_a_prompt_under_512_bytes_has_no_keys() -> None:
    body = _body(random.Random(5), 511)
    assert prefix_scan.longest_known({}, body, 0.0) == (-1, [], None)
    assert prefix_scan.longest_known({}, b"{}", 0.0) == (-1, [], None)
    assert prefix_scan.prefix_keys(body, body.find(b'"messages"')) == []


@pytest.mark.parametrize("functions", [NATIVE, PYTHON], ids=["kernel", "python"])
def test_a_start_outside_the_body_is_refused(functions: tuple) -> None:  # type: ignore[type-arg]
    with pytest.raises(ValueError, match="start 11 is outside a 10-byte body"):
        functions[1](b"0123456789", 11)
    with pytest.raises(ValueError, match="start -1"):
        functions[1](b"0123456789", -1)


def test_the_kernel_refuses_an_index_that_is_not_a_dict() -> None:
    with pytest.raises(TypeError, match="index must be a dict, not list"):
        prefix_scan.longest_known([], b"{}", 0.0)  # type: ignore[arg-type]


def test_without_the_kernel_a_cache_aware_route_warns_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(prefix_affinity, "NATIVE", False)
    prefix_affinity.warn_without_kernel.cache_clear()
    caplog.set_level(logging.WARNING, "kiban.gateway.prefix_affinity")
    for _ in range(2):
        prefix_affinity.CacheAware(CacheAwarePolicy(), [], list)
    assert [r.getMessage() for r in caplog.records] == [prefix_affinity.WITHOUT_KERNEL]
