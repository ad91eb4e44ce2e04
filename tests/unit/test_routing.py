"""Route strategies, the retry budget, the circuit breaker and API key checks."""

from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path

import pytest

from kiban.config import ApiKeys, ConfigError, parse_config
from kiban.gateway.auth import KeyChecker, load_keys
from kiban.gateway.engines import Circuit, CircuitBreaker
from kiban.gateway.routing import RetryBudget, Router


def _router(strategy: str, weights: tuple[float, ...] = (1, 1, 1)) -> Router:
    engines = [
        {
            "name": n,
            "kind": "vllm",
            "url": f"http://127.0.0.1:{9000 + i}",
            "models": ["m"],
            "weight": w,
        }
        for i, (n, w) in enumerate(zip(("a", "b", "c"), weights, strict=True))
    ]
    raw = {
        "engines": engines,
        "routes": [{"model": "m", "engines": ["a", "b", "c"], "strategy": strategy}],
    }
    return Router(parse_config(raw, {}))


def _firsts(router: Router, n: int) -> list[str]:
    route = router.route_for("m")
    assert route is not None
    return [route.candidates()[0].engine.name for _ in range(n)]


def test_priority_keeps_order_and_skips_unhealthy() -> None:
    router = _router("priority")
    assert _firsts(router, 3) == ["a", "a", "a"]
    router.engines["a"].healthy = False
    route = router.route_for("m")
    assert [t.engine.name for t in route.candidates()] == ["b", "c"]


def test_round_robin_rotates() -> None:
    assert _firsts(_router("round_robin"), 6) == ["a", "b", "c", "a", "b", "c"]


def test_weighted_spreads_by_weight() -> None:
    counts = Counter(_firsts(_router("weighted", (5, 1, 1)), 70))
    assert counts == {"a": 50, "b": 10, "c": 10}


def test_least_outstanding_prefers_idle_engine() -> None:
    router = _router("least_outstanding")
    router.engines["a"].outstanding = 3
    router.engines["b"].outstanding = 1
    router.engines["c"].outstanding = 2
    route = router.route_for("m")
    assert [t.engine.name for t in route.candidates()] == ["b", "c", "a"]


def test_least_outstanding_over_two_engines_counts_their_load_and_rotates_ties() -> None:
    router = _router("least_outstanding")
    router.engines["c"].healthy = False  # two usable engines: the inline comparison
    assert _firsts(router, 4) == ["a", "b", "a", "b"]  # equal load: the rotation decides
    router.engines["a"].outstanding = 1
    assert _firsts(router, 2) == ["b", "b"]
    router.engines["b"].load_penalty = 2  # the engine's own queue or KV use (engine_load)
    assert _firsts(router, 2) == ["a", "a"]
    route = router.route_for("m")
    assert route is not None
    assert [t.engine.name for t in route.candidates()] == ["a", "b"]


def test_ewma_latency_prefers_fast_engine() -> None:
    router = _router("ewma_latency")
    for name, latency in (("a", 0.5), ("b", 0.05), ("c", 0.2)):
        router.engines[name].observe_latency(latency)
    assert _firsts(router, 3) == ["b", "b", "b"]


def test_concurrency_limit_removes_engine() -> None:
    router = _router("priority")
    upstream = router.engines["a"]
    upstream.outstanding = upstream.config.max_concurrency
    assert _firsts(router, 1) == ["b"]


def test_circuit_breaker_opens_half_opens_and_closes() -> None:
    breaker = CircuitBreaker(failures_to_open=2, cooldown_s=10)
    breaker.on_failure(100.0)
    assert breaker.allows(100.0)
    breaker.on_failure(100.0)
    assert breaker.state is Circuit.OPEN and not breaker.allows(105.0)
    assert breaker.allows(110.0) and breaker.state is Circuit.HALF_OPEN
    breaker.on_attempt()
    assert not breaker.allows(110.0)  # one probe at a time
    breaker.on_failure(111.0)
    assert breaker.state is Circuit.OPEN and not breaker.allows(115.0)
    assert breaker.allows(121.0)
    breaker.on_attempt()
    breaker.on_success()
    assert breaker.state is Circuit.CLOSED and breaker.consecutive_failures == 0


def test_retry_budget_limits_retries_to_a_share_of_traffic() -> None:
    budget = RetryBudget(ratio=0.2, min_per_s=0.0)
    budget.tokens = 0.0
    for _ in range(10):
        budget.deposit()
    granted = sum(budget.try_withdraw() for _ in range(10))
    assert granted == 2


def test_api_keys_from_env_and_file(tmp_path: Path) -> None:
    keyfile = tmp_path / "keys"
    digest = hashlib.sha256(b"filed-key").hexdigest()
    keyfile.write_text(f"# comment\nplain-key\nsha256:{digest}\n")
    keys = load_keys(ApiKeys(env=["K1"], file=keyfile), {"K1": "env-key"})
    checker = KeyChecker(keys)
    for key in (b"env-key", b"plain-key", b"filed-key"):
        assert checker.grant_for(b"Bearer " + key) is not None
    assert checker.grant_for(b"bearer env-key") is not None
    for bad in (None, b"", b"env-key", b"Bearer wrong", b"Basic env-key", b"Bearer "):
        assert checker.grant_for(bad) is None


def test_api_key_errors_name_the_source(tmp_path: Path) -> None:
    bad = tmp_path / "keys"
    bad.write_text("sha256:abc\n")
    with pytest.raises(ConfigError) as info:
        load_keys(ApiKeys(env=["MISSING"], file=bad), {})
    assert info.value.problems == [
        "gateway.api_keys.env[0]: environment variable MISSING is not set",
        "gateway.api_keys.file: line 1 is not a valid sha256 digest",
    ]
