"""The cache_aware and session strategies: affinity, the balance guard, bounded load, metrics."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from kiban.config import ConfigError, parse_config
from kiban.gateway import prefix_affinity, prefix_scan
from kiban.gateway.engines import Circuit
from kiban.gateway.metrics import Metrics
from kiban.gateway.prefix_scan import BOUNDARIES, prompt_keys
from kiban.gateway.routing import Route, Router

ENGINES = ("a", "b", "c")


@pytest.fixture(autouse=True, params=["kernel", "python"])
def prefix_code(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test here runs with the C kernel and again with its Python fallback."""
    if request.param == "python":
        monkeypatch.setattr(prefix_affinity, "PrefixIndex", prefix_scan.PythonPrefixIndex)
    return str(request.param)


@dataclass
class Request:
    body: bytes
    payload: dict[str, Any] = field(default_factory=dict)
    client_headers: list[tuple[bytes, bytes]] = field(default_factory=list)


def _router(strategy: str, **route: Any) -> Router:
    engines = [
        {"name": n, "kind": "llamacpp", "url": f"http://127.0.0.1:{9000 + i}", "models": ["m"]}
        for i, n in enumerate(ENGINES)
    ]
    routes = [{"model": "m", "engines": list(ENGINES), "strategy": strategy, **route}]
    return Router(parse_config({"engines": engines, "routes": routes}, {}))


def _route(router: Router) -> Route:
    route = router.route_for("m")
    assert route is not None
    return route


def _chat(messages: list[dict[str, str]], **extra: Any) -> Request:
    payload = {"model": "m", "messages": messages, **extra}
    return Request(orjson.dumps(payload), payload)


def _conversation(n: int, turns: int) -> list[Request]:
    """The requests of one chat, each re-sending the history so far."""
    history = [{"role": "system", "content": f"You are assistant {n}. " + "Be brief. " * 60}]
    out = []
    for turn in range(turns):
        history.append({"role": "user", "content": f"question {turn} of chat {n}: " + "why? " * 40})
        out.append(_chat(list(history)))
        history.append({"role": "assistant", "content": f"answer {turn}: " + "because. " * 30})
    return out


def _pick(route: Route, request: Request) -> str:
    return route.candidates(request=request)[0].engine.name


# -- the prefix index ---------------------------------------------------------------------------


def test_prefixes_start_at_512_bytes_and_grow_by_half() -> None:
    assert BOUNDARIES[:5] == (512, 768, 1152, 1728, 2592)
    body = b'{"model":"m","messages":' + b"x" * 5000
    assert len(prompt_keys(body)) == 6  # 5 KB
    assert len(prompt_keys(b'"messages"' + b"x" * (1 << 20))) == 19  # 1 MB
    assert prompt_keys(b'{"messages":[]}') == []
    # a prompt that extends another shares its keys; the model field before it does not count
    longer = b'{"model":"other","messages":' + b"x" * 9000
    assert prompt_keys(longer)[:6] == prompt_keys(body)


def test_a_prompt_that_differs_in_one_segment_shares_only_the_keys_before_it() -> None:
    body = b'{"messages":' + bytes(range(256)) * 24  # 6 KB: 7 prefixes
    keys = prompt_keys(body)
    assert len(set(keys)) == len(keys) == 7
    for at in (600, 1000, 2000, 4000):  # inside segments 1, 2, 3 and 5
        changed = body[:at] + b"!" + body[at + 1 :]
        other = prompt_keys(changed)
        same = sum(1 for boundary in BOUNDARIES[:7] if boundary <= at - 1)
        assert other[:same] == keys[:same]
        assert not set(other[same:]) & set(keys), at


def test_turns_of_a_conversation_stay_on_one_engine_and_all_engines_serve() -> None:
    route = _route(_router("cache_aware"))
    chats = [_conversation(n, 5) for n in range(13)]
    served: dict[int, set[str]] = {n: set() for n in range(13)}
    for turn in range(5):  # interleaved, as concurrent users would send them
        for n, chat in enumerate(chats):
            served[n].add(_pick(route, chat[turn]))
    assert all(len(engines) == 1 for engines in served.values()), served
    assert Counter(next(iter(e)) for e in served.values()).keys() == set(ENGINES)


def test_the_longest_matching_prefix_wins() -> None:
    route = _route(_router("cache_aware"))
    base = [{"role": "system", "content": "s " * 400}]
    first = _pick(route, _chat(base))
    longer = [*base, {"role": "user", "content": "u " * 600}]
    # b is idle and a (or whoever took the first) is not: least outstanding alone would move
    route.targets[ENGINES.index(first)].engine.outstanding = 2
    assert _pick(route, _chat(longer)) == first
    # a third engine records a longer prefix of the same conversation, the next turn follows it
    other = next(n for n in ENGINES if n != first)
    strategy = route.request_order
    extended = _chat([*longer, {"role": "assistant", "content": "a " * 2000}])
    strategy.index.record(extended.body, 1 << ENGINES.index(other))
    assert (
        _pick(route, _chat([*extended.payload["messages"], {"role": "user", "content": "?"}]))
        == other
    )


def test_a_shared_prefix_below_min_match_does_not_attract() -> None:
    route = _route(_router("cache_aware", cache_aware={"min_match": 0.5}))
    system = {"role": "system", "content": "common " * 100}  # ~700 bytes shared by everyone
    picks = Counter(
        _pick(route, _chat([system, {"role": "user", "content": f"{n} " + "x" * 3000}]))
        for n in range(30)
    )
    assert set(picks) == set(ENGINES), picks  # least outstanding rotation, not one engine


def test_guard_spreads_a_hot_prefix_when_load_is_unbalanced() -> None:
    route = _route(_router("cache_aware"))
    hot = _conversation(0, 1)[0]
    taken: list[str] = []
    for _ in range(30):  # requests held in flight, as slow generations of one hot prompt
        target = route.candidates(request=hot)[0]
        assert target.engine.try_acquire()
        taken.append(target.engine.name)
    load = Counter(taken)
    assert set(load) == set(ENGINES), load
    # the guard keeps the spread within balance_abs (4) of the idlest, plus the one that tips it
    assert max(load.values()) - min(load.values()) <= 5, load
    # the prefix is recorded on every engine that served it: once balanced, each is a match
    strategy = route.request_order
    assert strategy.holders(prompt_keys(hot.body)[-1]) == list(ENGINES)


def test_only_healthy_closed_engines_below_their_limit_take_a_prefix() -> None:
    router = _router("cache_aware")
    route = _route(router)
    chat = _conversation(0, 3)
    owner = _pick(route, chat[0])
    upstream = router.engines[owner]
    upstream.breaker.state = Circuit.OPEN
    upstream.breaker.opened_at = 1e18
    moved = _pick(route, chat[1])
    assert moved != owner
    upstream.breaker.state = Circuit.CLOSED
    upstream.healthy = False
    assert _pick(route, chat[2]) != owner
    upstream.healthy = True
    upstream.outstanding = upstream.config.max_concurrency
    assert _pick(route, chat[2]) != owner


def test_index_is_bounded_and_evictions_are_counted() -> None:
    router = _router("cache_aware", cache_aware={"max_prefixes": 16})
    route = _route(router)
    metrics = Metrics()
    metrics.prepare(router.routes)
    for n in range(20):
        _pick(route, _conversation(n, 1)[0])
    assert len(route.request_order.index) == 16
    values = _values(metrics)
    evicted = values[("kiban_route_prefix_evictions_total", (("route", "m"),))]
    keys_per_prompt = len(prompt_keys(_conversation(0, 1)[0].body))
    assert evicted >= 20 * keys_per_prompt - 16 > 0
    assert (
        values[("kiban_route_affinity_decisions_total", (("outcome", "miss"), ("route", "m")))]
        == 20
    )


def test_a_miss_records_every_prefix_and_a_hit_refreshes_the_matched_and_longer() -> None:
    route = _route(_router("cache_aware"))
    index = route.request_order.index
    chat = _conversation(0, 2)
    first = prompt_keys(chat[0].body)
    owner = _pick(route, chat[0])  # a miss: every prefix, the longest most recently used
    assert index.keys() == first
    other = _conversation(1, 1)[0]
    _pick(route, other)
    second = prompt_keys(chat[1].body)
    assert second[: len(first)] == first and len(second) > len(first)  # the next turn
    assert _pick(route, chat[1]) == owner  # a hit on the first turn's longest prefix
    # refreshed: that prefix and the next turn's longer ones, the longest most recent
    assert index.keys()[-(len(second) - len(first) + 1) :] == second[len(first) - 1 :]
    # the first turn's shorter prefixes were not: they age behind the other chat's
    order = index.keys()
    other_first = prompt_keys(other.body)[0]
    assert order.index(first[-2]) < order.index(other_first)


def test_no_prompt_goes_to_the_least_outstanding_engine() -> None:
    router = _router("cache_aware")
    route = _route(router)
    router.engines["a"].outstanding = 2
    router.engines["c"].outstanding = 1
    assert _pick(route, _chat([{"role": "user", "content": "hi"}])) == "b"


# -- sessions -------------------------------------------------------------------------------------


def _session(key: str, header: str = "x-session-id") -> Request:
    return Request(
        b"{}", {}, [(b"content-type", b"application/json"), (header.encode(), key.encode())]
    )


def test_a_session_sticks_to_one_engine_and_sessions_spread() -> None:
    route = _route(_router("session"))
    owners = {}
    for n in range(60):
        picks = {_pick(route, _session(f"s{n}")) for _ in range(5)}
        assert len(picks) == 1
        owners[n] = picks.pop()
    spread = Counter(owners.values())
    assert set(spread) == set(ENGINES) and min(spread.values()) >= 8, spread


@pytest.mark.parametrize("key", ["user", "prompt_cache_key"])
def test_the_session_key_can_be_a_request_field(key: str) -> None:
    route = _route(_router("session", session={"key": key}))
    owners = {
        n: {_pick(route, Request(b"{}", {key: f"u{n}"})) for _ in range(3)} for n in range(30)
    }
    assert all(len(p) == 1 for p in owners.values())
    assert len({p.pop() for p in owners.values()}) == 3
    # the header is not the key here: without the field the request is balanced
    assert route.request_order.key_of(_session("s1")) is None


def test_a_custom_session_header() -> None:
    route = _route(_router("session", session={"header": "X-Conversation"}))
    strategy = route.request_order
    assert strategy.key_of(_session("c1", "x-conversation")) == b"c1"
    assert strategy.key_of(_session("c1")) is None


def test_sessions_move_off_an_unhealthy_engine_and_come_back() -> None:
    router = _router("session")
    route = _route(router)
    before = {n: _pick(route, _session(f"s{n}")) for n in range(60)}
    router.engines["a"].healthy = False
    during = {n: _pick(route, _session(f"s{n}")) for n in range(60)}
    assert "a" not in during.values()
    # consistent hashing: only a's sessions moved
    assert all(during[n] == before[n] for n in before if before[n] != "a")
    router.engines["a"].healthy = True
    assert {n: _pick(route, _session(f"s{n}")) for n in range(60)} == before


def test_bounded_load_moves_sessions_off_a_busy_engine() -> None:
    router = _router("session")
    route = _route(router)
    owner = _pick(route, _session("hot"))
    router.engines[owner].outstanding = 4  # bound: max(ceil(1.25 * 5 / 3), 4) = 4
    assert _pick(route, _session("hot")) != owner
    router.engines[owner].outstanding = 3
    assert _pick(route, _session("hot")) == owner


def test_requests_without_a_session_key_are_balanced() -> None:
    router = _router("session")
    route = _route(router)
    router.engines["a"].outstanding = 1
    router.engines["b"].outstanding = 1
    assert _pick(route, Request(b"{}")) == "c"


def test_the_ring_is_the_same_in_every_process() -> None:
    route = _route(_router("session"))
    here = [_pick(route, _session(f"s{n}")) for n in range(20)]
    code = (
        "from tests.unit.test_affinity_routing import _router, _route, _pick, _session;"
        "r = _route(_router('session'));"
        "print(','.join(_pick(r, _session(f's{n}')) for n in range(20)))"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().split(",") == here


def test_counts_of_replaced_routes_are_published_before_a_reload_drops_them() -> None:
    metrics = Metrics()
    old = _router("cache_aware", cache_aware={"max_prefixes": 16})
    metrics.prepare(old.routes)
    chats = [_conversation(n, 1)[0] for n in range(20)]
    for chat in chats:
        _pick(_route(old), chat)  # misses, each recording every prefix
    evicted = _route(old).request_order.evictions
    assert evicted == sum(len(prompt_keys(c.body)) for c in chats) - 16 > 0
    new = _router("cache_aware", cache_aware={"max_prefixes": 16})
    metrics.prepare(new.routes)  # what a reload does once the new routes serve
    _pick(_route(new), _conversation(9, 1)[0])
    values = _values(metrics)
    miss = ("kiban_route_affinity_decisions_total", (("outcome", "miss"), ("route", "m")))
    assert values[miss] == 21
    assert values[("kiban_route_prefix_evictions_total", (("route", "m"),))] == evicted
    assert _values(metrics)[miss] == 21  # a second exposition adds nothing twice


def test_session_decisions_are_counted() -> None:
    router = _router("session")
    metrics = Metrics()
    metrics.prepare(router.routes)
    route = _route(router)
    owner = _pick(route, _session("k"))
    router.engines[owner].healthy = False
    _pick(route, _session("k"))
    _pick(route, Request(b"{}"))
    values = _values(metrics)
    for outcome in ("sticky", "moved", "no_key"):
        key = ("kiban_route_affinity_decisions_total", (("outcome", outcome), ("route", "m")))
        assert values[key] == 1, outcome


# -- configuration --------------------------------------------------------------------------------


def _config_error(route: dict[str, Any]) -> list[str]:
    raw = {
        "engines": [{"name": "a", "kind": "vllm", "url": "http://127.0.0.1:1", "models": ["m"]}],
        "routes": [{"model": "m", "engines": ["a"], **route}],
    }
    with pytest.raises(ConfigError) as info:
        parse_config(raw, {})
    return info.value.problems


def test_config_errors_name_the_key_and_value() -> None:
    problems = _config_error({"strategy": "session", "session": {"key": "cookie"}})
    assert problems == [
        "routes[0].session.key: expected one of header, user or prompt_cache_key (got 'cookie')"
    ]
    problems = _config_error({"strategy": "cache_aware", "cache_aware": {"min_match": 1.5}})
    assert problems[0].startswith("routes[0].cache_aware.min_match:") and "(got 1.5)" in problems[0]
    problems = _config_error({"strategy": "cache_aware", "cache_aware": {"balance_rel": 0.5}})
    assert problems[0].startswith("routes[0].cache_aware.balance_rel:")
    problems = _config_error({"strategy": "least_outstanding", "session": {"key": "user"}})
    assert problems == [
        "routes[0].session: settings of strategy 'session', but the route's strategy is "
        "'least_outstanding'"
    ]


def test_a_cache_aware_route_takes_at_most_64_engines() -> None:
    engines = [
        {"name": f"e{i}", "kind": "vllm", "url": f"http://127.0.0.1:{i + 1}", "models": ["m"]}
        for i in range(65)
    ]
    route = {"model": "m", "engines": [e["name"] for e in engines], "strategy": "cache_aware"}
    with pytest.raises(ConfigError) as info:
        parse_config({"engines": engines, "routes": [route]}, {})
    assert info.value.problems == [
        "routes[0].engines: a cache_aware route takes at most 64 engines (its index holds a "
        "64-bit mask), not 65"
    ]
    route["engines"] = route["engines"][:64]
    assert len(Router(parse_config({"engines": engines, "routes": [route]}, {})).engines) == 65


def _values(metrics: Metrics) -> dict[tuple[str, tuple], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(metrics.render().decode())
        for s in family.samples
    }
