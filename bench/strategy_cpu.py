"""CPU per request a route strategy adds, kiban gateways measured in turns a few seconds apart.

bench/gateways.py measures one gateway per round: between its rounds the
VM's speed moves CPU per request by 20-80 µs, more than a strategy costs.
Here one ``kiban serve`` per strategy (one worker each, its route over
``--engines`` engines that all point at one nginx fixed answer) runs on the
same CPU, and they take turns: `kiban bench` loads one (``--connections``,
closed loop, the same prompts in the same order) for ``--seconds`` while the
others idle, then the next, ``--turns`` times. A drift of the machine's
speed reaches every gateway within seconds, so the differences of CPU per
request (utime + stime of each gateway process, from /proc, over the
requests it answered) resolve a few µs. Each round starts fresh gateways (a
process's memory layout moves its CPU per request by a few µs) in an order
rotated from round to round. With ``--together`` all gateways are loaded at
once in each turn: the same moment for all, but sharing the CPU they evict
each other's caches, which inflates what a strategy's own data costs.

    .venv/bin/python bench/strategy_cpu.py \\
        [--strategies least_outstanding,cache_aware,round_robin] [--rounds 6] [--turns 5]

The first strategy is the baseline; a strategy named twice runs twice (an
A/A check of the method: its copies should differ by nothing). ``--prefixes``
distinct prompts of about ``--prefix-bytes`` (1,000 of 4 KB) are each sent
once before the rounds, so cache_aware holds them all and every measured
request is a hit. The load generators and nginx run on the first CPU, the
gateways on the second (taskset). Every process started here is stopped at
the end; every turn is bounded in seconds.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import targets
from gateways import _READY_BODY, CHAT, Loads, Placement, bench_result, paired_summary
from procs import Service, stop_on_sigterm


def _load_all(urls: list[str], requests: int, seconds: float, loads: Loads) -> list[int]:
    """One `kiban bench` per gateway (``--connections`` each), all at once, each until
    *requests* or *seconds*; the requests each one completed."""
    connections = loads.args.connections
    procs = [
        subprocess.Popen(
            loads.bench_argv(url, requests, connections, seconds),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for url in urls
    ]
    done = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=seconds + 120)
            result = bench_result(proc.returncode, out, err)
            if result["errors"]:
                raise RuntimeError(f"kiban bench: {result['errors']} requests failed")
            done.append(result["requests"])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return done


def _start_gateways(
    strategies: list[str],
    order: list[int],
    work: Path,
    upstream: str,
    args: argparse.Namespace,
    place: Placement,
) -> list[tuple[Service, str]]:
    """One fresh kiban per strategy, started in *order*; each ready to answer."""
    started: dict[int, tuple[Service, str]] = {}
    try:
        for i in order:
            gateway = targets.kiban(1, strategies[i], args.engines)
            service, url = gateway.start(work, upstream, place.gateway)
            started[i] = (service.start(), url)
            auth = {"Authorization": f"Bearer {targets.API_KEY}"}
            service.wait_ready(url + CHAT, _READY_BODY, timeout_s=180, headers=auth)
    except BaseException:
        for service, _ in started.values():
            service.stop()
        raise
    return [started[i] for i in range(len(strategies))]


def _round(
    strategies: list[str],
    labels: list[str],
    number: int,
    work: Path,
    upstream: str,
    loads: Loads,
) -> dict[str, float]:
    """CPU µs per request of fresh gateways loaded in turns, in an order rotated by *number*."""
    order = list(range(len(strategies)))
    order = order[number % len(order) :] + order[: number % len(order)]
    args, place = loads.args, loads.place
    gateways = _start_gateways(strategies, order, work, upstream, args, place)
    cpu_s = [0.0] * len(strategies)
    served = [0] * len(strategies)
    try:
        # every prompt once, so cache_aware holds them all
        _load_all([gateways[i][1] for i in order], args.prefixes, 600, loads)
        # one gateway loaded at a time, the others idle; --together: all at once
        groups = [order] if args.together else [[i] for i in order]
        for _ in range(args.turns):
            for group in groups:
                before = [gateways[i][0].cpu_seconds() for i in group]
                urls = [gateways[i][1] for i in group]
                done = _load_all(urls, 10**8, args.seconds, loads)
                for i, was, count in zip(group, before, done, strict=True):
                    served[i] += count
                    cpu_s[i] += gateways[i][0].cpu_seconds() - was
    finally:
        for service, _ in gateways:
            service.stop()
    cpu_us = {label: cpu / n * 1e6 for label, cpu, n in zip(labels, cpu_s, served, strict=True)}
    base = cpu_us[labels[0]]
    line = "  ".join(f"{s} {v - base:+6.1f}" for s, v in list(cpu_us.items())[1:])
    print(
        f"round {number + 1}: {min(served)}-{max(served)} requests each; "
        f"{labels[0]} {base:.1f} µs/request; {line}",
        file=sys.stderr,
    )
    return cpu_us


def measure(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    place = Placement(pin=not args.no_pin)
    strategies = args.strategies.split(",")
    labels = [
        s if strategies.count(s) == 1 else f"{s}#{strategies[:i].count(s) + 1}"
        for i, s in enumerate(strategies)
    ]
    loads = Loads(args, place, work)
    upstream, upstream_url = targets.nginx(work, place.engine)
    upstream.start()
    try:
        upstream.wait_ready(upstream_url + "/health")
        rounds = [
            _round(strategies, labels, n, work, upstream_url, loads) for n in range(args.rounds)
        ]
    finally:
        upstream.stop()
    return {
        "strategies": labels,
        "turns": f"{args.turns} x {args.seconds:g} s",
        "connections": args.connections,
        "rounds": rounds,
    }


def summary(result: dict[str, Any]) -> list[str]:
    """Per strategy: CPU µs per request over the rounds, and its difference to the baseline."""
    rounds = result["rounds"]
    cpu = {s: dict(enumerate(r[s] for r in rounds)) for s in result["strategies"]}
    return [
        f"# CPU µs per request, {len(rounds)} rounds of {result['turns']} turns "
        f"over {result['connections']} connections per gateway",
        *paired_summary(cpu),
    ]


def main() -> None:
    stop_on_sigterm()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--strategies", default="least_outstanding,cache_aware,round_robin")
    parser.add_argument("--engines", type=int, default=2)
    parser.add_argument("--prefixes", type=int, default=1000)
    parser.add_argument("--prefix-bytes", type=int, default=4096)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--turns", type=int, default=5, help="of each gateway in a round")
    parser.add_argument("--seconds", type=float, default=3, help="of each turn")
    parser.add_argument(
        "--together",
        action="store_true",
        help="load every gateway at once instead (they then evict each other's caches)",
    )
    parser.add_argument("--connections", type=int, default=8, help="per gateway")
    parser.add_argument("--no-pin", action="store_true")
    parser.add_argument("--json", type=Path, help="write the results here too")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="kiban-strategy-cpu-") as tmp:
        result = measure(args, Path(tmp))
    print("\n".join(summary(result)))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
