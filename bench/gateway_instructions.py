"""Instructions per request of the whole gateway, by route strategy, counted by valgrind.

On a shared VM the gateway benchmark's CPU per request (bench/gateways.py)
moves by 50-100 µs between rounds, and with the gateway's own throughput; an
instruction count does not. For each strategy this starts one kiban worker
as bench/gateways.py does (its route over ``--engines`` engines that all
point at one nginx fixed answer) under callgrind, sends ``--prefixes``
distinct prompts of about ``--prefix-bytes`` (cache_aware then holds them
all), zeroes callgrind's counters, sends ``--requests`` more over
``--connections`` connections, and reads what the worker executed for them:
parse, auth, routing, the upstream call, the answer, metrics and the access
log; everything a request costs.

    .venv/bin/python bench/gateway_instructions.py \\
        [--strategies least_outstanding,cache_aware,round_robin] [--requests 2000]

Health checks are set an hour apart, so no periodic work lands in the
window; an idle window of a few seconds after it is counted too, as a check.
Needs valgrind and callgrind_control (Debian package valgrind). Every process
started here is stopped at the end.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import targets
from gateways import _READY_BODY, CHAT, Loads, Placement
from procs import stop_on_sigterm


def _callgrind(pid: int, command: str) -> None:
    """Send callgrind_control *command* (zero, dump) to the worker under valgrind."""
    done = subprocess.run(
        ["callgrind_control", f"--{command}", str(pid)], capture_output=True, text=True, timeout=60
    )
    if done.returncode or "OK" not in done.stdout:
        raise RuntimeError(f"callgrind_control --{command} {pid}: {done.stdout}{done.stderr}")


def _summary(dump: Path) -> dict[str, int]:
    """Counts in one callgrind dump by event (Ir: instructions; with --cache-sim, the misses)."""
    text = dump.read_text()
    events = re.search(r"^events: (.+)$", text, re.MULTILINE)
    found = re.search(r"^summary: (.+)$", text, re.MULTILINE)
    if events is None or found is None:
        raise RuntimeError(f"no events or summary line in {dump}")
    names, counts = events.group(1).split(), [int(n) for n in found.group(1).split()]
    counts += [0] * (len(names) - len(counts))  # callgrind leaves trailing zeros out
    return dict(zip(names, counts, strict=True))


def _dump_after(out: Path, pid: int, number: int) -> dict[str, int]:
    """Dump the counters since the last zero; the instructions in it."""
    _callgrind(pid, "dump")
    dump = Path(f"{out}.{number}")
    deadline = time.monotonic() + 60
    while not dump.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    return _summary(dump)


def _all_ok(result: dict[str, Any]) -> None:
    if result["ok"] != result["requests"]:
        raise RuntimeError(f"{result['requests'] - result['ok']} requests failed: {result}")


def measure(
    strategy: str, args: argparse.Namespace, work: Path, upstream: str, loads: Loads
) -> dict[str, Any]:
    """One strategy: warm-up, then the counted requests and an idle window."""
    # health checks an hour apart: no periodic work in the counted window
    gateway = targets.kiban(1, strategy, args.engines, {"health_interval_s": 3600})
    service, url = gateway.start(work, upstream, None)
    out = work / f"callgrind.{strategy}"
    service.argv = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}",
                    *(["--cache-sim=yes"] if args.cache_sim else []),
                    sys.executable, "-m", "kiban.cli", *service.argv[1:]]  # fmt: skip
    service.start()
    try:
        auth = {"Authorization": f"Bearer {targets.API_KEY}"}
        service.wait_ready(url + CHAT, _READY_BODY, timeout_s=900, headers=auth)
        _all_ok(loads.bench(url, args.prefixes, args.connections))  # every prompt once
        _callgrind(service.pid, "zero")
        started = time.monotonic()
        _all_ok(loads.bench(url, args.requests, args.connections))
        seconds = time.monotonic() - started
        counted = _dump_after(out, service.pid, 1)
        _callgrind(service.pid, "zero")
        time.sleep(args.idle_s)
        idle = _dump_after(out, service.pid, 2)
    finally:
        service.stop()
    idle_rate = idle["Ir"] / args.idle_s
    return {
        "strategy": strategy,
        "requests": args.requests,
        "instructions": counted["Ir"],
        "per_request": counted["Ir"] / args.requests,
        "seconds_under_valgrind": seconds,
        "idle_instructions_per_s": idle_rate,
        # what the event loop does anyway while the requests run (timers), taken out
        "per_request_less_idle": (counted["Ir"] - idle_rate * seconds) / args.requests,
        "events_per_request": {event: n / args.requests for event, n in counted.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--strategies", default="least_outstanding,cache_aware,round_robin")
    parser.add_argument("--engines", type=int, default=2)
    parser.add_argument("--prefixes", type=int, default=1000)
    parser.add_argument("--prefix-bytes", type=int, default=4096)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--connections", type=int, default=1)
    parser.add_argument("--idle-s", type=float, default=5.0)
    parser.add_argument("--max-seconds", type=float, default=3600, help="bound of each load")
    parser.add_argument("--cache-sim", action="store_true", help="count cache misses too")
    parser.add_argument("--json", type=Path, help="write the results here too")
    args = parser.parse_args()
    stop_on_sigterm()
    work = Path(tempfile.mkdtemp(prefix="kiban-instr-"))
    nginx, nginx_url = targets.nginx(work, None)
    nginx.start()
    try:
        nginx.wait_ready(nginx_url + CHAT, _READY_BODY)
        loads = Loads(args, Placement(pin=False), work)
        results = [
            measure(s.strip(), args, work, nginx_url, loads) for s in args.strategies.split(",")
        ]
    finally:
        nginx.stop()
    base, net = results[0]["per_request"], results[0]["per_request_less_idle"]
    print(f"# whole-gateway instructions per request: {args.requests} requests over "
          f"{args.connections} connection(s), {args.prefixes} prompts of ~{args.prefix_bytes} "
          f"bytes, route over {args.engines} engines")  # fmt: skip
    print(f"{'strategy':<20} {'counted':>9} {'vs first':>9} {'less idle':>10} {'vs first':>9}"
          f" {'idle/s':>9}")  # fmt: skip
    for r in results:
        mine, less = r["per_request"], r["per_request_less_idle"]
        print(f"{r['strategy']:<20} {mine:>9,.0f} {mine - base:>+9,.0f} {less:>10,.0f} "
              f"{less - net:>+9,.0f} {r['idle_instructions_per_s']:>9,.0f}")  # fmt: skip
    if args.cache_sim:
        print("# per request, by callgrind's cache simulation (D1: first level; LL: last level)")
        for r in results:
            events = r["events_per_request"]
            print(f"{r['strategy']:<20} " + "  ".join(
                f"{e} {events[e]:,.0f}" for e in ("D1mr", "D1mw", "DLmr", "DLmw", "I1mr")
            ))  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)},
                                         "results": results}, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
