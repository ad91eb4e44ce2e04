"""The order and pace of attempts after each kind of failure (kiban/gateway/failover.py)."""

from __future__ import annotations

from kiban.config import parse_config
from kiban.gateway.failover import FailoverPlan, Failure, retry_after_s
from kiban.gateway.routing import Router
from kiban.gateway.targets import Target

CONTEXTS = {"first": 50, "unknown": None, "smaller": 40, "larger": 1000}


def _targets(**failover) -> tuple[list[Target], Router]:
    engines = [
        {"name": n, "kind": "vllm", "url": f"http://127.0.0.1:{9000 + i}", "models": ["m"]}
        | ({"context": c} if c else {})
        for i, (n, c) in enumerate(CONTEXTS.items())
    ]
    route = {"model": "m", "engines": list(CONTEXTS), "failover": failover}
    router = Router(parse_config({"engines": engines, "routes": [route]}, {}))
    return router.routes[0].targets, router


def _plan(now: list[float], deadline: float = 100.0, attempts: int = 10, **failover):
    targets, router = _targets(**failover)
    route = router.routes[0]
    retries = route.config.retries.model_copy(update={"attempts": attempts})
    plan = FailoverPlan(targets, route.config.failover, retries, deadline, lambda: now[0])
    return plan, iter(plan)


def _next(attempts) -> str:
    return next(attempts).engine.name


def test_context_refusal_goes_to_larger_then_unknown_then_no_larger() -> None:
    plan, attempts = _plan([0.0])
    first = next(attempts)
    plan.record(first, Failure("context_length", "too long", 400))
    assert plan.wait_s == 0
    assert [t.engine.name for t in attempts] == ["larger", "unknown", "smaller"]


def test_context_refusal_with_next_keeps_the_route_order() -> None:
    plan, attempts = _plan([0.0], context_length="next")
    plan.record(next(attempts), Failure("context_length", "too long", 400))
    assert [t.engine.name for t in attempts] == ["unknown", "smaller", "larger"]


def test_5xx_retries_the_same_engine_with_growing_backoff_then_moves_on() -> None:
    plan, attempts = _plan([0.0], same_engine_retries=2, same_engine_backoff_s=1.0)
    waits = []
    for _ in range(3):
        target = next(attempts)
        assert target.engine.name == "first"
        plan.record(target, Failure("status", "HTTP 500", 500))
        waits.append(plan.wait_s)
    assert 0.5 <= waits[0] <= 1.5 and 1.0 <= waits[1] <= 3.0  # doubling, with jitter
    assert _next(attempts) == "unknown"


def test_retry_after_is_waited_when_it_fits_the_deadline() -> None:
    now = [0.0]
    plan, attempts = _plan(now, deadline=10.0)
    target = next(attempts)
    plan.record(target, Failure("status", "HTTP 429", 429, retry_after=b"2"))
    assert plan.wait_s == 2.0 and _next(attempts) == "first"
    now[0] = 5.0
    plan.record(target, Failure("status", "HTTP 429", 429, retry_after=b"7"))
    assert _next(attempts) == "unknown"  # 5 + 7 is past the deadline (and retries are spent)
    plan, attempts = _plan([0.0], deadline=5.0)
    plan.record(next(attempts), Failure("status", "HTTP 429", 429, retry_after=b"7"))
    assert _next(attempts) == "unknown"


def test_timeouts_and_malformed_answers_move_on_and_attempts_bound_all() -> None:
    plan, attempts = _plan([0.0], attempts=3)
    plan.record(next(attempts), Failure("timeout", "no answer"))
    second = next(attempts)
    assert second.engine.name == "unknown"
    plan.record(second, Failure("malformed", "invalid JSON"))
    assert _next(attempts) == "smaller"
    assert list(attempts) == []  # three attempts in all


def test_retry_after_header_values() -> None:
    assert retry_after_s(b"2") == 2.0 and retry_after_s(b"0.5") == 0.5
    assert retry_after_s(b"Wed, 21 Oct 2015 07:28:00 GMT") is None
    assert retry_after_s(None) is None and retry_after_s(b"-1") is None
