"""`kiban serve --workers N` on a machine with many cores: does req/s scale with N?

The 2-core development machine cannot show it (the load generator and the
upstream share the cores). Here, on the 16-core GPU machine (no GPU used):

* upstreams: 4 processes of bench/sse_upstream.py answering a fixed chat
  completion (non-streaming), on CPUs 0-3;
* load: 4 processes of `kiban bench` (closed loop, 32 connections each), on CPUs 4-7;
* kiban: `kiban serve --workers N` (N = 1, 2, 4, 8) on CPUs 8-15, with the
  full feature path (API key, round robin over the 4 upstreams, health checks,
  metrics, the request log to a file).

For each N: requests/s summed over the load processes, p50 of each, and the CPU
time per request of kiban's process tree (/proc). Direct (load processes to the
upstreams) is measured first, to show the load side is not the limit. Writes
workers_scaling.json and workers_scaling.md to $OUT.

    python3 bench/device/workers_scaling.py [--seconds 10] [--workers 1,2,4,8]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
KEY = "sk-bench-scaling"
# 16 cores: 4 for the upstreams, 4 for the load, 8 for kiban; fewer: everything everywhere
PINNED = (os.cpu_count() or 1) >= 16
UPSTREAM_CPUS = ["0", "1", "2", "3"]
LOAD_CPUS = ["4", "5", "6", "7"]
GATEWAY_CPUS = "8-15"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start(argv: list[str], cpus: str, log: Path, env: dict[str, str] | None = None):
    with log.open("ab") as fh:
        return subprocess.Popen(
            ["taskset", "-c", cpus, *argv] if PINNED else argv,
            stdout=fh,
            stderr=subprocess.STDOUT,
            env=os.environ | (env or {}),
            start_new_session=True,
        )


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def wait_ready(url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"{url} not ready")


def tree_cpu_seconds(pid: int) -> float:
    """utime + stime of *pid* and its children (reaped or alive), in seconds."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(stat.parent.name) == pid or int(fields[1]) == pid:
            total += (int(fields[11]) + int(fields[12]) + int(fields[13]) + int(fields[14])) / ticks
    return total


def load(urls: list[str], seconds: float, work: Path) -> list[dict]:
    """One `kiban bench` per load CPU, all at once; their JSON results."""
    procs = []
    for i, url in enumerate(urls):
        out = work / f"load-{i}.json"
        argv = [
            sys.executable, "-m", "kiban.cli", "bench", url, "-m", "bench", "-c", "32",
            "-d", str(seconds), "--warmup", "200", "--api-key", KEY, "-o", str(out), "-q",
        ]  # fmt: skip
        procs.append((start(argv, LOAD_CPUS[i], work / f"load-{i}.log"), out))
    results = []
    for proc, out in procs:
        proc.wait(seconds + 120)
        results.append(json.loads(out.read_text())["result"])
    return results


def summarise(label: str, results: list[dict], cpu_s: float | None) -> dict:
    requests = sum(r["requests"] for r in results)
    rps = sum(r["requests_per_s"] for r in results)
    p50 = max(r["latency_ms"]["p50"] for r in results)
    errors = sum(sum(r.get("errors", {}).values()) for r in results)
    row = {"target": label, "requests": requests, "requests_per_s": rps, "p50_ms": p50}
    row["errors"] = errors
    row["cpu_us_per_request"] = None if cpu_s is None else cpu_s / max(requests, 1) * 1e6
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--workers", default="1,2,4,8")
    args = parser.parse_args()
    out = Path(os.environ.get("OUT", "out"))
    out.mkdir(parents=True, exist_ok=True)
    work = Path("/tmp/kiban-scaling")
    work.mkdir(parents=True, exist_ok=True)
    env = {"PYTHONPATH": os.environ.get("PYTHONPATH", ""), "KIBAN_BENCH_KEY": KEY}
    upstreams, ports = [], []
    try:
        for cpu in UPSTREAM_CPUS:
            port = free_port()
            argv = [sys.executable, str(REPO / "bench/sse_upstream.py"), "--port", str(port)]
            upstreams.append(start(argv, cpu, work / f"upstream-{port}.log"))
            ports.append(port)
        for port in ports:
            wait_ready(f"http://127.0.0.1:{port}/health")
        rows = [
            summarise(
                "direct (4 upstream processes)",
                load([f"http://127.0.0.1:{p}" for p in ports], args.seconds, work),
                None,
            )
        ]
        for n in [int(x) for x in args.workers.split(",")]:
            gport = free_port()
            config = {
                "gateway": {"port": gport, "api_keys": {"env": ["KIBAN_BENCH_KEY"]}},
                "engines": [
                    {"name": f"u{i}", "kind": "openai", "url": f"http://127.0.0.1:{p}",
                     "models": ["bench"]}
                    for i, p in enumerate(ports)
                ],
                "routes": [{"model": "bench", "engines": [f"u{i}" for i in range(len(ports))],
                            "strategy": "round_robin"}],
            }  # fmt: skip
            path = work / f"kiban-{n}.json"
            path.write_text(json.dumps(config))  # JSON is YAML
            argv = [sys.executable, "-m", "kiban.cli", "serve", "-c", str(path),
                    "--workers", str(n)]  # fmt: skip
            gateway = start(argv, GATEWAY_CPUS, work / f"kiban-{n}.log", env)
            try:
                wait_ready(f"http://127.0.0.1:{gport}/health")
                time.sleep(1.0)
                url = f"http://127.0.0.1:{gport}"
                load([url] * len(LOAD_CPUS), 2.0, work)  # warm every worker
                before = tree_cpu_seconds(gateway.pid)
                results = load([url] * len(LOAD_CPUS), args.seconds, work)
                cpu = tree_cpu_seconds(gateway.pid) - before
                rows.append(summarise(f"kiban, {n} worker{'s' if n > 1 else ''}", results, cpu))
            finally:
                stop(gateway)
    finally:
        for proc in upstreams:
            stop(proc)
    one = next(r for r in rows if r["target"] == "kiban, 1 worker")
    lines = [
        "| target | req/s | x 1 worker | p50 ms (max of 4 loads) | CPU µs/req | errors |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        ratio = "" if r is rows[0] else f"{r['requests_per_s'] / one['requests_per_s']:.2f}x"
        cpu = "-" if r["cpu_us_per_request"] is None else f"{r['cpu_us_per_request']:.1f}"
        lines.append(
            f"| {r['target']} | {r['requests_per_s']:,.0f} | {ratio} | {r['p50_ms']:.3f} | "
            f"{cpu} | {r['errors']} |"
        )
    (out / "workers_scaling.md").write_text("\n".join(lines) + "\n")
    (out / "workers_scaling.json").write_text(json.dumps(rows, indent=2) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
