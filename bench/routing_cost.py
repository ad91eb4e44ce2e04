"""CPU cost of one routing decision per strategy, in µs (the gateway's pick of an engine).

Times ``Route.candidates`` (what the proxy calls once per request) on a route
of three engines with the gateway's metrics bound, after the JSON parse of the
body that the gateway does first (in every case; the differences to
least_outstanding are the strategies' own cost):

- least_outstanding (the baseline);
- cache_aware with ``--conversations`` chats in its index, each request the
  next turn of one of them (a hit);
- cache_aware while the balance guard decides (one engine far busier);
- session with a key in the ``X-Session-ID`` header, and without a key.

Each request body is a chat of about ``--prompt-bytes`` bytes, built and parsed
before timing, as the gateway has it when it routes.

    .venv/bin/python bench/routing_cost.py [--conversations 1000] [--prompt-bytes 4096]
        [--picks 200000] [--repeats 5] [--json]

Times are CPU time of the process (``time.process_time_ns``). Each of the
``--repeats`` rounds times every case in turn (a drift in the machine's speed
reaches all cases alike); printed: each case's best round, and the median over
rounds of its difference to least_outstanding in the same round.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import orjson

from kiban.config import parse_config
from kiban.gateway.metrics import Metrics
from kiban.gateway.routing import Route, Router

ENGINES = ("a", "b", "c")


@dataclass
class Request:
    body: bytes
    payload: dict[str, Any]
    client_headers: list[tuple[bytes, bytes]] = field(default_factory=list)


def _route(strategy: str) -> Route:
    engines = [
        {"name": n, "kind": "llamacpp", "url": f"http://127.0.0.1:{9000 + i}", "models": ["m"]}
        for i, n in enumerate(ENGINES)
    ]
    routes = [{"model": "m", "engines": list(ENGINES), "strategy": strategy}]
    router = Router(parse_config({"engines": engines, "routes": routes}, {}))
    Metrics().prepare(router.routes)
    route = router.route_for("m")
    assert route is not None
    return route


def _chat(n: int, prompt_bytes: int, turns_extra: int = 0) -> Request:
    """A chat of about *prompt_bytes* (plus *turns_extra* more turns), as a client sends it."""
    messages = [{"role": "system", "content": f"You are assistant {n}. Answer briefly."}]
    turn = 0
    while len(orjson.dumps(messages)) < prompt_bytes or turns_extra > 0:
        if len(orjson.dumps(messages)) >= prompt_bytes:
            turns_extra -= 1
        messages.append({"role": "user", "content": f"Question {turn} of chat {n}: " + "why " * 40})
        messages.append({"role": "assistant", "content": f"Answer {turn}: " + "because " * 30})
        turn += 1
    messages.append({"role": "user", "content": "And then?"})
    payload = {"model": "m", "messages": messages, "max_tokens": 64, "stream": True}
    headers = [
        (b"host", b"127.0.0.1:8080"),
        (b"content-type", b"application/json"),
        (b"authorization", b"Bearer sk-local"),
        (b"x-session-id", f"session-{n}".encode()),
    ]
    return Request(orjson.dumps(payload), payload, headers)


def _time(route: Route, requests: list[Request], picks: int) -> float:
    """CPU µs per request of parsing its body (as the gateway does first) and routing it.

    The parse is in every case, so the differences are the strategies'; it also
    leaves the body in the CPU cache, as it is when the gateway routes.
    """
    candidates = route.candidates
    loads = orjson.loads
    count = len(requests)
    start = time.process_time_ns()
    for i in range(picks):
        request = requests[i % count]
        loads(request.body)
        candidates(False, request)
    return (time.process_time_ns() - start) / picks / 1000


def _outcomes(route: Route, requests: list[Request]) -> dict[str, int]:
    """What the strategy decides for one pass over *requests* (not timed)."""
    strategy = route.request_order
    if strategy is None:
        return {}
    before = list(strategy.decisions)
    for request in requests:
        route.candidates(False, request)
    made = [n - was for n, was in zip(strategy.decisions, before, strict=True)]
    return {o: n for o, n in zip(strategy.OUTCOMES, made, strict=True) if n}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--conversations", type=int, default=1000)
    parser.add_argument("--prompt-bytes", type=int, default=4096)
    parser.add_argument("--picks", type=int, default=200_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    first = [_chat(n, args.prompt_bytes) for n in range(args.conversations)]
    later = [_chat(n, args.prompt_bytes, turns_extra=1) for n in range(args.conversations)]
    no_key = [Request(r.body, r.payload, r.client_headers[:3]) for r in later]

    cases: dict[str, tuple[Route, list[Request]]] = {}
    cases["least_outstanding"] = (_route("least_outstanding"), later)
    cached = _route("cache_aware")
    for request in first:
        cached.candidates(False, request)
    cases["cache_aware (hit)"] = (cached, later)
    guarded = _route("cache_aware")
    for request in first:
        guarded.candidates(False, request)
    guarded.targets[0].engine.outstanding = 12  # busiest 12, idlest 0: the guard decides
    cases["cache_aware (guard)"] = (guarded, later)
    cases["session (key)"] = (_route("session"), later)
    cases["session (no key)"] = (_route("session"), no_key)

    outcomes = {name: _outcomes(route, requests) for name, (route, requests) in cases.items()}
    # rounds interleave the cases, so a drift in the machine's speed reaches them all alike
    rounds: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.repeats):
        for name, (route, requests) in cases.items():
            rounds[name].append(_time(route, requests, args.picks))
    results = {name: min(times) for name, times in rounds.items()}
    base = results["least_outstanding"]
    paired = {
        name: statistics.median(map(float.__sub__, times, rounds["least_outstanding"]))
        for name, times in rounds.items()
    }
    body = sum(len(r.body) for r in later) // len(later)
    if args.json:
        print(json.dumps({"mean_body_bytes": body, "us_per_pick": results, "rounds": rounds,
                          "outcomes": outcomes}))  # fmt: skip
        return
    print(f"# {platform.python_implementation()} {platform.python_version()}, "
          f"{args.conversations} conversations, mean body {body} bytes, "
          f"{args.repeats} interleaved rounds x {args.picks} picks")  # fmt: skip
    print(f"{'strategy':<22} {'best µs/req':>11} {'best - LO':>10} {'median of round - LO':>21}"
          "  decisions")  # fmt: skip
    for name, us in results.items():
        line = f"{name:<22} {us:>11.2f} {us - base:>+10.2f} {paired[name]:>+21.2f}"
        print(f"{line}  {outcomes[name]}")


if __name__ == "__main__":
    main()
