"""CPU per request a route strategy adds, measured on kiban gateways running side by side.

bench/gateways.py measures one gateway at a time: between its rounds the
VM's speed moves CPU per request by 20-80 µs, more than a strategy costs.
Here one ``kiban serve`` per strategy (one worker each, its route over
``--engines`` engines that all point at one nginx fixed answer) runs at the
same time on the same CPU, each loaded by its own `kiban bench` (the same
prompts in the same order, ``--connections`` each, closed loop), all started
together. Whatever slows the machine slows every gateway alike within the
same milliseconds, so the differences of CPU per request (utime + stime of
each gateway process, from /proc) resolve a few µs.

    .venv/bin/python bench/strategy_cpu.py \\
        [--strategies least_outstanding,cache_aware,round_robin] [--rounds 6] [--requests 20000]

The first strategy is the baseline. ``--prefixes`` distinct prompts of about
``--prefix-bytes`` (1,000 of 4 KB) are each sent once before the rounds, so
cache_aware holds them all and every measured request is a hit. The load
generators and nginx run on the first CPU, the gateways on the second
(taskset). With ``--connections 1`` every request wakes a gateway whose
caches the others have just used: CPU per request is 2-3 times what it is
under load, the differences too. Every process started here is stopped at
the end; every round is bounded in requests and seconds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import targets
from gateways import _READY_BODY, CHAT, KIBAN, NONSTREAM_MAX_TOKENS, Placement, _prompt_file
from procs import Service, pinned, stop_on_sigterm


def _bench_argv(url: str, prompts: Path, requests: int, args: argparse.Namespace) -> list[str]:
    return [
        KIBAN, "bench", url, "--model", targets.MODEL, "--requests", str(requests),
        "--duration", str(args.max_seconds), "--concurrency", str(args.connections),
        "--api-key", targets.API_KEY, "--max-tokens", str(NONSTREAM_MAX_TOKENS),
        "--prompt-file", str(prompts), "--json", "--quiet",
    ]  # fmt: skip


def _load_all(urls: list[str], prompts: Path, requests: int, args: argparse.Namespace,
              cpus: str | None) -> list[int]:  # fmt: skip
    """One `kiban bench` per gateway, all at once; the requests each one completed."""
    procs = [
        subprocess.Popen(
            pinned(_bench_argv(url, prompts, requests, args), cpus),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for url in urls
    ]
    done = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=args.max_seconds + 120)
            if proc.returncode not in (0, 1):
                raise RuntimeError(f"kiban bench failed ({proc.returncode}):\n{err}")
            result = json.loads(out)["result"]
            if result["errors"]:
                raise RuntimeError(f"kiban bench: {result['errors']} requests failed")
            done.append(result["requests"])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return done


def measure(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    place = Placement(pin=not args.no_pin)
    strategies = args.strategies.split(",")
    prompts = _prompt_file(work, args.prefixes, args.prefix_bytes)
    assert prompts is not None
    live: list[Service] = []
    try:
        upstream, upstream_url = targets.nginx(work, place.engine)
        live.append(upstream.start())
        upstream.wait_ready(upstream_url + "/health")
        gateways, urls = [], []
        for strategy in strategies:
            service, url = targets.kiban(1, strategy, args.engines).start(
                work, upstream_url, place.gateway
            )
            live.append(service.start())
            auth = {"Authorization": f"Bearer {targets.API_KEY}"}
            service.wait_ready(url + CHAT, _READY_BODY, timeout_s=180, headers=auth)
            gateways.append(service)
            urls.append(url)
        _load_all(urls, prompts, args.prefixes, args, place.generator)  # every prompt once
        rounds: list[dict[str, float]] = []
        for number in range(args.rounds):
            before = [g.cpu_seconds() for g in gateways]
            started = time.monotonic()
            served = _load_all(urls, prompts, args.requests, args, place.generator)
            elapsed = time.monotonic() - started
            after = [g.cpu_seconds() for g in gateways]
            cpu_us = {
                s: (a - b) / n * 1e6
                for s, a, b, n in zip(strategies, after, before, served, strict=True)
            }
            rounds.append(cpu_us)
            base = cpu_us[strategies[0]]
            line = "  ".join(f"{s} {v - base:+6.1f}" for s, v in list(cpu_us.items())[1:])
            print(
                f"round {number + 1}: {min(served)}-{max(served)} requests each in "
                f"{elapsed:.0f} s; {strategies[0]} {base:.1f} µs/request; {line}",
                file=sys.stderr,
            )
        return {
            "strategies": strategies,
            "requests_per_round": args.requests,
            "connections": args.connections,
            "rounds": rounds,
        }
    finally:
        for service in reversed(live):
            service.stop()


def summary(result: dict[str, Any]) -> list[str]:
    """Per strategy: CPU µs per request, and its difference to the baseline (mean, spread)."""
    strategies, rounds = result["strategies"], result["rounds"]
    base = strategies[0]
    lines = [
        f"# CPU per request, {len(rounds)} rounds of {result['requests_per_round']:,} "
        f"requests over {result['connections']} connections per gateway"
    ]
    for strategy in strategies:
        values = [r[strategy] for r in rounds]
        text = f"{strategy:<20} {statistics.mean(values):7.1f} µs"
        if strategy != base:
            diffs = [r[strategy] - r[base] for r in rounds]
            text += (
                f"   vs {base}: mean {statistics.mean(diffs):+5.1f}, median "
                f"{statistics.median(diffs):+5.1f}, rounds {min(diffs):+5.1f} to {max(diffs):+5.1f}"
            )
        lines.append(text)
    return lines


def main() -> None:
    stop_on_sigterm()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--strategies", default="least_outstanding,cache_aware,round_robin")
    parser.add_argument("--engines", type=int, default=2)
    parser.add_argument("--prefixes", type=int, default=1000)
    parser.add_argument("--prefix-bytes", type=int, default=4096)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--requests", type=int, default=20000, help="per gateway and round")
    parser.add_argument("--connections", type=int, default=8, help="per gateway")
    parser.add_argument("--max-seconds", type=float, default=600, help="bound of each round")
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
