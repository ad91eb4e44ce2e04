"""Instructions per routing decision, counted by valgrind: a figure that load does not move.

On a shared 2-core machine CPU time per request moves by more than the few
µs a strategy costs; callgrind's instruction count does not. Each case builds
a route of three engines (``--conversations`` chats of about 5 KB in the
cache_aware index, as bench/routing_cost.py does), then parses and routes
``--picks`` requests inside ``functools.reduce``, and callgrind counts only
what runs inside that call:

    .venv/bin/python bench/routing_instructions.py [--picks 2000] [--conversations 1000]

Needs valgrind (Debian package). Prints instructions per request for each
case and the difference to least_outstanding.
"""

from __future__ import annotations

import argparse
import functools
import re
import subprocess
import sys

import orjson
from routing_cost import _chat, _route

CASES = ("least_outstanding", "cache_aware", "session")


def _run_case(strategy: str, picks: int, conversations: int) -> None:
    """Inside valgrind: build the route, then the counted picks."""
    first = [_chat(n, 4096) for n in range(conversations)]
    later = [_chat(n, 4096, turns_extra=1) for n in range(conversations)]
    route = _route(strategy)
    for request in first:
        route.candidates(False, request)
    candidates, loads = route.candidates, orjson.loads
    requests = [later[i % conversations] for i in range(picks)]

    def step(acc: int, request: object) -> int:
        loads(request.body)  # type: ignore[attr-defined]
        candidates(False, request)  # type: ignore[arg-type]
        return acc

    functools.reduce(step, requests, 0)


def _count(strategy: str, args: argparse.Namespace) -> int:
    argv = ["valgrind", "--tool=callgrind", "--collect-atstart=no",
            "--toggle-collect=functools_reduce", "--callgrind-out-file=/dev/null",
            sys.executable, __file__, "--case", strategy, "--picks", str(args.picks),
            "--conversations", str(args.conversations)]  # fmt: skip
    env = {"PYTHONHASHSEED": "0"}
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=1800)
    found = re.search(r"Collected : (\d+)", done.stderr)
    if done.returncode or not found:
        raise SystemExit(f"valgrind failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return int(found.group(1)) // args.picks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--picks", type=int, default=2000)
    parser.add_argument("--conversations", type=int, default=1000)
    parser.add_argument("--case", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        _run_case(args.case, args.picks, args.conversations)
        return
    counts = {case: _count(case, args) for case in CASES}
    base = counts["least_outstanding"]
    print(f"# instructions per request (parse + route), {args.picks} picks, "
          f"{args.conversations} conversations in the index")  # fmt: skip
    for case, n in counts.items():
        print(f"{case:<20} {n:>9,} {n - base:>+9,}")


if __name__ == "__main__":
    main()
