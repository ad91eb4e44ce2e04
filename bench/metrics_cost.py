"""Cost of recording the gateway's metrics for one request, in ns (the hot path).

Measures what the gateway does per request after its engine answered:
in-flight inc/dec plus ``Metrics.observe_exchange`` (status counter, latency,
TTFT, inter-token latency, chunks, tokens), for a non-streaming and a
streaming request, with label children bound once and cached (what the
gateway does) and, for comparison, looked up with ``.labels()`` every time.
Both in one process and in multiprocess mode (``--workers N``), where every
value lives in an mmap file.

    .venv/bin/python bench/metrics_cost.py [--requests 200000] [--repeats 5] [--json]

Times are CPU time of the process (``time.process_time_ns``), which other
load on a shared machine disturbs less than wall time; the best of the
repeats is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time


def _exchange(stream: bool):
    from kiban.gateway.proxy import Exchange

    ex = Exchange(
        request_id="r",
        endpoint="chat",
        body=b"{}",
        payload={},
        model="m",
        stream=stream,
        client_headers=[],
    )
    ex.engine, ex.status, ex.attempts = "engine-a", 200, 1
    ex.usage = {"prompt_tokens": 31, "completion_tokens": 128, "total_tokens": 159}
    if stream:
        ex.ttft_s, ex.itl_s, ex.chunks = 0.042, 0.006, 130
    return ex


def _bound(metrics, ex, n: int) -> float:
    in_flight = metrics.in_flight_for
    observe = metrics.observe_exchange
    start = time.process_time_ns()
    for _ in range(n):
        gauge = in_flight("route-a")
        gauge.inc()
        gauge.dec()
        observe("route-a", ex, 0.25)
    return (time.process_time_ns() - start) / n


def _unbound(metrics, ex, n: int) -> float:
    """The same records with a ``.labels()`` lookup for each, as before the cache."""
    m = metrics
    route = "route-a"
    start = time.process_time_ns()
    for _ in range(n):
        gauge = m.in_flight.labels(route)
        gauge.inc()
        gauge.dec()
        engine = ex.engine
        m.requests.labels(route, engine, str(ex.status)).inc()
        m.duration.labels(route, engine).observe(0.25)
        if ex.ttft_s is not None:
            m.ttft.labels(route, engine).observe(ex.ttft_s)
            m.chunks.labels(route, engine).inc(ex.chunks)
            m.itl.labels(route, engine).observe(ex.itl_s)
        m.tokens.labels(route, engine, "prompt").inc(ex.usage["prompt_tokens"])
        m.tokens.labels(route, engine, "completion").inc(ex.usage["completion_tokens"])
    return (time.process_time_ns() - start) / n


def measure(requests: int, repeats: int) -> dict[str, float]:
    from kiban.gateway.metrics import Metrics

    metrics = Metrics()
    results: dict[str, float] = {}
    for stream in (False, True):
        ex = _exchange(stream)
        kind = "stream" if stream else "non-stream"
        for name, fn in (("bound", _bound), ("labels()", _unbound)):
            fn(metrics, ex, 1000)  # warm up: create the children
            best = min(fn(metrics, ex, requests) for _ in range(repeats))
            results[f"{kind}, {name}"] = round(best, 1)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.requests, args.repeats)))
        return
    modes: dict[str, dict[str, float]] = {}
    for mode in ("one process", "multiprocess"):
        env = dict(os.environ)
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        with tempfile.TemporaryDirectory(prefix="kiban-bench-metrics-") as tmp:
            if mode == "multiprocess":
                env["PROMETHEUS_MULTIPROC_DIR"] = tmp
            out = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--child",
                    f"--requests={args.requests}",
                    f"--repeats={args.repeats}",
                ],
                env=env,
                check=True,
                capture_output=True,
                text=True,
            ).stdout
        modes[mode] = json.loads(out)
    report = {
        "unit": "CPU ns per request",
        "requests": args.requests,
        "repeats": args.repeats,
        "python": platform.python_version(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "results": modes,
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(
        f"metrics recorded per request, CPU ns (best of {args.repeats} x {args.requests}; "
        f"Python {report['python']}, {report['machine']})"
    )
    print(f"{'path':<28}{'one process':>14}{'multiprocess':>14}")
    for key in modes["one process"]:
        print(f"{key:<28}{modes['one process'][key]:>14.0f}{modes['multiprocess'][key]:>14.0f}")


if __name__ == "__main__":
    main()
