"""tests/support/load.py: background load stops by itself, and a broken target cannot grow us."""

from __future__ import annotations

import threading
import time

import pytest

from tests.support.load import KEPT_FAILURES, background_load


def _workers_alive() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("load-")]


def test_failures_are_counted_but_few_are_kept() -> None:
    def broken() -> None:
        raise ConnectionError("gateway gone")

    with background_load(broken, workers=3, max_requests=60, max_seconds=30) as load:
        load.run_out()
    assert load.failure_count == 60 and load.results == []
    assert len(load.failures) == KEPT_FAILURES
    assert load.failure_types == {"ConnectionError": 60}
    assert "60 failed" in load.describe_failures()
    assert _workers_alive() == []


def test_workers_stop_when_the_block_fails() -> None:
    started = time.monotonic()
    slow = background_load(lambda: time.sleep(0.01), workers=3, max_requests=10**6, max_seconds=600)
    with pytest.raises(AssertionError, match="inside the block"), slow as load:
        while len(load.results) < 5:
            time.sleep(0.01)
        raise AssertionError("inside the block")
    assert _workers_alive() == [] and time.monotonic() - started < 10
    assert load.stop.is_set()


def test_time_bound_ends_the_load() -> None:
    started = time.monotonic()
    with background_load(
        lambda: time.sleep(0.01), workers=2, max_requests=10**6, max_seconds=0.5
    ) as load:
        load.run_out()
    assert 0.5 <= time.monotonic() - started < 5
    assert 10 < len(load.results) < 200
