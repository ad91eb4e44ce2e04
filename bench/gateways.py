"""Gateway overhead side by side: direct, kiban (1 and N workers), LiteLLM proxy, vllm-router.

One command, from the repository root after scripts/bootstrap.sh:

    .venv/bin/python bench/gateways.py            (or: make bench)

It starts the upstreams (nginx answering a fixed chat completion; the SSE
upstream of bench/sse_upstream.py), installs the pinned peers on first use
(~/.cache/kiban/bench/), then for each gateway, with one engine behind it:

* non-streaming, 8 connections, a fixed number of requests (`kiban bench`):
  requests/s, p50/p99, and the gateway's CPU time per request (utime + stime
  of its process tree from /proc, before and after);
* non-streaming, 1 connection (`kiban bench`): p50/p99 added over direct;
* wrk, 8 connections, a few seconds: requests/s again, as a cross-check of
  the load generator;
* streaming, 8 connections (`kiban bench --stream`): streams/s, chunks/s, CPU
  time per relayed chunk; 1 connection: time to first token added;
* kiban, 1 worker: RSS after the first 1000 requests and after --rss-requests.

Routing strategies (issue 17): ``--kiban-strategy least_outstanding,cache_aware``
measures kiban once per strategy, its route over ``--kiban-engines`` (2) engines
that all point at the one upstream; ``--prefixes 1000`` makes every `kiban bench`
run send 1,000 distinct prompts of about ``--prefix-bytes`` in turn (so cache_aware
holds 1,000 prefixes, all sent once in the warm-up); ``--rounds N`` repeats the
targets N times, interleaved (every other round in reverse order), and prints
each strategy's CPU per request (mean, spread) and its difference to the first
strategy in each round (mean, median, spread):

    .venv/bin/python bench/gateways.py --only kiban-1 --no-stream --wrk-seconds 0 \
        --kiban-strategy least_outstanding,cache_aware --prefixes 1000 --rounds 5 --rate 1000

A gateway's CPU per request falls as its throughput rises (the event loop
batches more per wake-up), so in a closed loop a strategy that happens to run
slower reads as costlier; ``--rate`` offers every gateway the same arrivals.

Load generators run on the first CPU, the gateway on the second (taskset),
the upstreams on the first; kiban with N workers runs on every CPU. Every
process started here is stopped (by PID / process group) at the end, and
every run is bounded in requests and seconds. The table is printed; the JSON
goes to --output.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import targets
from procs import Service, require_tools, rss_bytes, stop_on_sigterm
from rich.console import Console
from rich.table import Table

KIBAN = str(Path(sys.executable).with_name("kiban"))
REPO = Path(__file__).resolve().parent.parent
NONSTREAM_MAX_TOKENS = 16
CHAT = "/v1/chat/completions"
_READY_BODY = json.dumps(
    {"model": targets.MODEL, "messages": [{"role": "user", "content": "ready?"}], "max_tokens": 4}
).encode()

console = Console(stderr=True)


# -- placement -------------------------------------------------------------------------------


class Placement:
    """Which CPUs the load generator, the upstreams and a gateway run on."""

    def __init__(self, pin: bool) -> None:
        cpus = sorted(os.sched_getaffinity(0))
        self.pin = pin and len(cpus) >= 2
        self.generator = str(cpus[0]) if self.pin else None
        self.engine = str(cpus[0]) if self.pin else None
        self.gateway = str(cpus[1]) if self.pin else None

    def describe(self) -> str:
        if not self.pin:
            return "not pinned"
        return (
            f"load generator and upstreams on CPU {self.generator}, a single-process gateway "
            f"on CPU {self.gateway}, kiban with several workers on every CPU (taskset)"
        )


# -- load generators --------------------------------------------------------------------------


class Loads:
    """Runs `kiban bench` and wrk against a URL, pinned to the generator CPU."""

    def __init__(self, args: argparse.Namespace, place: Placement, work: Path) -> None:
        self.args = args
        self.place = place
        self.served: Counter[str] = Counter()  # requests sent to each URL
        self.prompt_file = _prompt_file(work, args.prefixes, args.prefix_bytes)
        self.lua = work / "post.lua"
        body = json.dumps(
            {
                "model": targets.MODEL,
                "messages": [{"role": "user", "content": "Say hello."}],
                "max_tokens": NONSTREAM_MAX_TOKENS,
            }
        )
        self.lua.write_text(
            'wrk.method = "POST"\n'
            f"wrk.body = '{body}'\n"
            'wrk.headers["Content-Type"] = "application/json"\n'
            f'wrk.headers["Authorization"] = "Bearer {targets.API_KEY}"\n'
        )

    def bench(
        self,
        url: str,
        requests: int,
        clients: int,
        stream: bool = False,
        max_s: float = 0,
        rate: float = 0,
    ) -> dict[str, Any]:
        """One `kiban bench` run; its JSON ``result``. With *rate*, an open loop: Poisson
        arrivals at that many requests/s over at most *clients* connections."""
        max_s = max_s or self.args.max_seconds
        argv = self.bench_argv(url, requests, clients, max_s, stream, rate)
        done = subprocess.run(argv, capture_output=True, text=True, timeout=max_s + 120)
        result = bench_result(done.returncode, done.stdout, done.stderr)
        self.served[url] += result["requests"]
        return result

    def bench_argv(
        self,
        url: str,
        requests: int,
        clients: int,
        max_s: float,
        stream: bool = False,
        rate: float = 0,
    ) -> list[str]:
        """The `kiban bench` command of one run, pinned to the generator CPU."""
        load = ["--rate", str(rate), "--max-connections"] if rate else ["--concurrency"]
        argv = [
            KIBAN,
            "bench",
            url,
            "--model",
            targets.MODEL,
            "--requests",
            str(requests),
            "--duration",
            str(max_s),
            *load,
            str(clients),
            "--api-key",
            targets.API_KEY,
            "--max-tokens",
            str(self.args.stream_tokens if stream else NONSTREAM_MAX_TOKENS),
            "--json",
            "--quiet",
            *(["--stream"] if stream else []),
            *(["--prompt-file", str(self.prompt_file)] if self.prompt_file else []),
        ]
        return _pinned(argv, self.place.generator)

    def wrk(self, url: str, connections: int, seconds: int) -> dict[str, Any]:
        """A duration-bound wrk run: requests/s, errors, and wrk's CPU per request."""
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        argv = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "-s", str(self.lua), url + CHAT]
        done = subprocess.run(
            _pinned(argv, self.place.generator),
            capture_output=True,
            text=True,
            timeout=seconds + 60,
        )
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        text = done.stdout
        count = re.search(r"(\d+) requests in", text)
        rps = re.search(r"Requests/sec:\s+([\d.]+)", text)
        if done.returncode or not count or not rps:
            raise RuntimeError(f"wrk failed ({done.returncode}):\n{text}{done.stderr}")
        requests = int(count.group(1))
        non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
        socket_errors = re.search(r"Socket errors: (.*)", text)
        cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
        self.served[url] += requests
        return {
            "requests": requests,
            "requests_per_s": float(rps.group(1)),
            "non_2xx": int(non2xx.group(1)) if non2xx else 0,
            "socket_errors": socket_errors.group(1) if socket_errors else None,
            "client_cpu_us_per_request": cpu / requests * 1e6 if requests else None,
        }


def bench_result(returncode: int, stdout: str, stderr: str) -> dict[str, Any]:
    """The JSON ``result`` of a finished `kiban bench` (exit 1: some requests failed)."""
    if returncode not in (0, 1):
        raise RuntimeError(f"kiban bench failed ({returncode}):\n{stderr}")
    return json.loads(stdout)["result"]


def _prompt_file(work: Path, count: int, size: int) -> Path | None:
    """*count* prompts of about *size* bytes, one a line, each distinct from its first word."""
    if not count:
        return None
    words = ("alpha", "beta", "gamma", "delta", "kappa", "sigma", "omega")
    lines = []
    for n in range(count):
        text = [f"Document {n}:"]
        length = len(text[0])
        i = n
        while length < size:
            word = f"{words[i % len(words)]}{(i * 7919) % 1000}"
            text.append(word)
            length += len(word) + 1
            i += 1
        lines.append(" ".join(text))
    path = work / "prompts.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


def _pinned(argv: list[str], cpus: str | None) -> list[str]:
    return ["taskset", "-c", cpus, *argv] if cpus else argv


# -- one target -------------------------------------------------------------------------------


def _start(
    gateway: targets.Gateway | None, work: Path, upstream: str, place: Placement, live: list
) -> tuple[Service | None, str]:
    """Start *gateway* in front of *upstream* (None: the upstream itself), wait until it
    answers a chat completion."""
    if gateway is None:
        return None, upstream
    cpus = place.gateway if gateway.pinned else None
    service, url = gateway.start(work, upstream, cpus)
    live.append(service.start())
    auth = {"Authorization": f"Bearer {targets.API_KEY}"}
    service.wait_ready(url + CHAT, _READY_BODY, timeout_s=180, headers=auth)
    return service, url


def _stop(service: Service | None, live: list) -> None:
    if service is not None:
        service.stop()
        live.remove(service)


def measure_nonstream(
    gateway: targets.Gateway | None,
    args: argparse.Namespace,
    loads: Loads,
    work: Path,
    upstream: str,
    place: Placement,
    live: list,
    rss_check: bool,
) -> dict[str, Any]:
    slow = gateway is not None and gateway.slow
    service, url = _start(gateway, work, upstream, place, live)
    row: dict[str, Any] = {}
    try:
        if rss_check:
            assert service is not None
            loads.bench(url, 1000, args.connections)
            row["rss_after_1000"] = rss_bytes(service.pid)
        else:  # every prompt of --prefixes once, so the measured run finds them cached
            warmup = args.slow_warmup if slow else max(args.warmup, args.prefixes)
            loads.bench(url, warmup, args.connections)
        cpu = service.cpu_seconds() if service else 0.0
        row["c8"] = loads.bench(
            url, args.slow_requests if slow else args.requests, args.connections, rate=args.rate
        )
        if service is not None:
            row["cpu_us_per_request"] = (
                (service.cpu_seconds() - cpu) / max(row["c8"]["requests"], 1) * 1e6
            )
        one_conn = args.slow_latency_requests if slow else args.latency_requests
        row["c1"] = loads.bench(url, one_conn, 1)
        if args.wrk_seconds:
            row["wrk"] = loads.wrk(url, args.connections, args.wrk_seconds)
        if args.profile and rss_check and service is not None:
            row["profile"] = profile(service.pid, url, args, loads)
        if rss_check and service is not None:
            left = args.rss_requests - loads.served[url]
            if left > 0:
                loads.bench(url, left, args.connections, max_s=args.rss_max_seconds)
            row["rss_requests"] = loads.served[url]
            row["rss_after_all"] = rss_bytes(service.pid)
    finally:
        _stop(service, live)
    return row


def measure_stream(
    gateway: targets.Gateway | None,
    args: argparse.Namespace,
    loads: Loads,
    work: Path,
    upstream: str,
    paced_upstream: str,
    place: Placement,
    live: list,
) -> dict[str, Any]:
    slow = gateway is not None and gateway.slow
    service, url = _start(gateway, work, upstream, place, live)
    row: dict[str, Any] = {}
    try:
        loads.bench(url, 4 if slow else 20, args.connections, stream=True)
        cpu = service.cpu_seconds() if service else 0.0
        row["c8"] = loads.bench(
            url, args.slow_streams if slow else args.streams, args.connections, stream=True
        )
        chunks = row["c8"]["stream_events"]
        if service is not None and chunks:
            row["cpu_us_per_chunk"] = (service.cpu_seconds() - cpu) / chunks * 1e6
    finally:
        _stop(service, live)
    # Time to first token at one connection, from an upstream paced like an engine (one
    # event per --ttft-interval): with back-to-back events three busy processes share two
    # cores, and the scheduler, not the gateway, decides when the client reads.
    service, url = _start(gateway, work, paced_upstream, place, live)
    try:
        row["c1"] = loads.bench(
            url, args.slow_ttft_streams if slow else args.ttft_streams, 1, stream=True
        )
    finally:
        _stop(service, live)
    return row


# -- profile ----------------------------------------------------------------------------------


def profile(pid: int, url: str, args: argparse.Namespace, loads: Loads) -> dict[str, Any]:
    """py-spy on the gateway during an extra non-streaming run: functions by self time."""
    py_spy = targets.ensure_venv("py-spy-0.4.3", targets.PY_SPY) / "bin" / "py-spy"
    raw = Path(tempfile.mkstemp(prefix="kiban-profile-", suffix=".txt")[1])
    argv = [str(py_spy), "record", "--pid", str(pid), "--format", "raw", "--output", str(raw)]
    # --native unwinds C frames (uvloop, httptools, the syscalls) but pauses the process at
    # each sample, so it samples less often; without it C time lands on the Python caller
    argv += (
        ["--native", "--rate", "200"] if args.profile_native else ["--nonblocking", "--rate", "500"]
    )
    spy = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(1.0)  # py-spy attaches
        loads.bench(url, args.profile_requests, args.connections)
    finally:
        spy.send_signal(signal.SIGINT)
        try:
            _, err = spy.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            spy.kill()
            _, err = spy.communicate()
    try:
        return summarise_profile(raw.read_text(), top=args.profile_top)
    except OSError:
        return {"error": f"py-spy wrote no profile: {err.strip()[-500:]}"}
    finally:
        raw.unlink(missing_ok=True)


def summarise_profile(collapsed: str, top: int) -> dict[str, Any]:
    """Self and total sample shares per function from py-spy's collapsed stacks."""
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    packages: Counter[str] = Counter()
    samples = 0
    for line in collapsed.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        samples += n
        frames = [re.sub(r":\d+\)$", ")", f) for f in stack.split(";")]
        own[frames[-1]] += n
        packages[_package(frames[-1])] += n
        for frame in set(frames):
            total[frame] += n
    share = (lambda n: round(100.0 * n / samples, 1)) if samples else (lambda n: 0.0)
    return {
        "samples": samples,
        "self": [[f, share(n)] for f, n in own.most_common(top)],
        "total": [[f, share(n)] for f, n in total.most_common(top)],
        "self_by_package": [[p, share(n)] for p, n in packages.most_common()],
    }


def _package(frame: str) -> str:
    """``uvicorn`` for ``send (uvicorn/protocols/http/httptools_impl.py)``; native code by
    its library (``libc.so.6``)."""
    where = frame.rpartition("(")[2].rstrip(")")
    top = where.split("/", 1)[0]
    return top.removesuffix(".py") if "/" in where or top.endswith(".py") else top


# -- report -----------------------------------------------------------------------------------


def _ms(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value:+.3f}" if signed else f"{value:.3f}"


def _num(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _get(row: dict[str, Any], *path: str) -> Any:
    node: Any = row
    for key in path:
        if not isinstance(node, dict) or key not in node or node[key] is None:
            return None
        node = node[key]
    return node


def derive(rows: list[dict[str, Any]]) -> None:
    """Added latencies over the direct row, errors per row."""
    direct = next((r for r in rows if r["key"] == "direct"), None)
    for row in rows:
        for mode, metric, name in (
            ("nonstream", "latency_ms", "added_p50_ms_c1"),
            ("stream", "ttft_ms", "added_ttft_p50_ms_c1"),
        ):
            mine = _get(row, mode, "c1", metric, "p50")
            base = _get(direct, mode, "c1", metric, "p50") if direct else None
            row[name] = None if mine is None or base is None else mine - base
        mine99 = _get(row, "nonstream", "c1", "latency_ms", "p99")
        base99 = _get(direct, "nonstream", "c1", "latency_ms", "p99") if direct else None
        row["added_p99_ms_c1"] = None if mine99 is None or base99 is None else mine99 - base99
        failed = 0
        for mode in ("nonstream", "stream"):
            for run in ("c8", "c1"):
                failed += sum((_get(row, mode, run, "errors") or {}).values())
            failed += _get(row, mode, "wrk", "non_2xx") or 0
        row["errors"] = failed


def table(rows: list[dict[str, Any]], args: argparse.Namespace) -> Table:
    c = args.connections
    rate = f" at {args.rate:g} req/s (open loop)" if args.rate else ""
    out = Table(
        title="Gateway overhead: one engine behind each gateway (an nginx fixed answer, "
        "or an SSE stream of "
        f"{args.stream_tokens} chunks)",
        caption="req/s, p50, p99, CPU: kiban bench with "
        f"{c} connections{rate}; +p50/+p99: 1 connection, over direct; wrk req/s: wrk, {c} "
        f"connections, {args.wrk_seconds} s; streams: kiban bench --stream, {c} connections; "
        "+TTFT: 1 connection, p50 over direct, from an upstream sending one event per "
        "--ttft-interval (1 ms) like an engine. CPU: the gateway's process tree.",
        header_style="bold",
    )
    for name in (
        "target",
        "req/s",
        "p50 ms",
        "p99 ms",
        "+p50 ms (1 conn)",
        "+p99 ms (1 conn)",
        "CPU µs/req",
        "wrk req/s",
        "streams/s",
        "chunks/s",
        "+TTFT ms (1 conn)",
        "CPU µs/chunk",
        "errors",
    ):
        out.add_column(name, justify="left" if name == "target" else "right")
    for row in rows:
        out.add_row(*_cells(row))
    return out


def target_checks(rows: list[dict[str, Any]], args: argparse.Namespace) -> list[dict[str, Any]]:
    """Issue 8's targets, measured in this run (ratios of figures from the same run)."""
    by = {r["key"]: r for r in rows}
    k1, kn = by.get("kiban-1"), by.get(f"kiban-{args.workers}")
    router, lite = by.get("vllm-router"), by.get("litellm")
    checks: list[dict[str, Any]] = []

    def check(name: str, value: float | None, limit: float, unit: str, below: bool = True):
        if value is None:
            return
        ok = value <= limit if below else value >= limit
        sign = "<=" if below else ">="
        checks.append(
            {"target": f"{name} {sign} {limit:g}{unit}", "measured": value, "unit": unit, "ok": ok}
        )

    cpu = lambda r: _get(r, "nonstream", "cpu_us_per_request") if r else None  # noqa: E731
    if cpu(k1) and cpu(router):
        check("kiban CPU/request ÷ vllm-router's", cpu(k1) / cpu(router), 2, "x")
    if cpu(k1) and cpu(lite):
        check("LiteLLM CPU/request ÷ kiban's", cpu(lite) / cpu(k1), 50, "x", below=False)
    if k1:
        check("kiban added p50 at 1 connection", k1["added_p50_ms_c1"], 0.3, " ms")
        check("kiban CPU per relayed chunk", _get(k1, "stream", "cpu_us_per_chunk"), 15, " µs")
        check("kiban TTFT added", k1["added_ttft_p50_ms_c1"], 1, " ms")
        rss0, rss1 = _get(k1, "nonstream", "rss_after_1000"), _get(k1, "nonstream", "rss_after_all")
        if rss0 and rss1:
            served = _get(k1, "nonstream", "rss_requests")
            growth = (rss1 - rss0) / 2**20
            check(f"kiban RSS growth, 1000 -> {served:,} requests", growth, 20, " MB")
    r1 = _get(k1, "nonstream", "c8", "requests_per_s") if k1 else None
    rn = _get(kn, "nonstream", "c8", "requests_per_s") if kn else None
    if r1 and rn and args.workers > 1:
        name = f"kiban {args.workers} workers req/s ÷ 1 worker"
        check(name, rn / r1, args.workers * 0.9, "x", below=False)
    return checks


def _loadavg() -> float:
    """The 1-minute load average: how busy the (shared) machine was."""
    return float(Path("/proc/loadavg").read_text().split()[0])


def machine() -> dict[str, Any]:
    model = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    mem = Path("/proc/meminfo").read_text().splitlines()[0].split()[1]
    nginx_version = subprocess.run(
        [targets.nginx_binary(), "-v"], capture_output=True, text=True
    ).stderr.strip()
    wrk_version = subprocess.run(["wrk", "-v"], capture_output=True, text=True).stdout
    return {
        "cpu": model,
        "cpus": os.cpu_count(),
        "memory_gib": round(int(mem) / 2**20, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "nginx": nginx_version.removeprefix("nginx version: "),
        "wrk": wrk_version.split("[")[0].strip(),
        "loadavg_start": Path("/proc/loadavg").read_text().split()[:3],
    }


# -- main -------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cpus = len(os.sched_getaffinity(0))
    p.add_argument("--requests", type=int, default=20000, help="non-streaming, 8 connections")
    p.add_argument("--latency-requests", type=int, default=3000, help="non-streaming, 1 conn")
    p.add_argument("--streams", type=int, default=200, help="streams at 8 connections")
    p.add_argument("--ttft-streams", type=int, default=100, help="streams at 1 connection")
    p.add_argument(
        "--ttft-interval", type=float, default=0.001, help="seconds between events (TTFT runs)"
    )
    p.add_argument("--ttft-tokens", type=int, default=32, help="events per stream (TTFT runs)")
    p.add_argument("--warmup", type=int, default=500)
    p.add_argument("--slow-requests", type=int, default=1000, help="the same for LiteLLM")
    p.add_argument("--slow-latency-requests", type=int, default=200)
    p.add_argument("--slow-streams", type=int, default=16)
    p.add_argument("--slow-ttft-streams", type=int, default=10)
    p.add_argument("--slow-warmup", type=int, default=100)
    p.add_argument("--stream-tokens", type=int, default=512, help="chunks of each stream")
    p.add_argument("--connections", type=int, default=8)
    p.add_argument(
        "--rate",
        type=float,
        default=0,
        help="the non-streaming run as an open loop at this many req/s (at most --connections "
        "at once): every gateway then sees the same arrivals, so its CPU per request does not "
        "move with its own throughput",
    )
    p.add_argument("--workers", type=int, default=max(cpus, 2), help="kiban's N workers")
    p.add_argument(
        "--rss-requests", type=int, default=100_000, help="issue 8 asks 1000000 (about 6 min)"
    )
    p.add_argument("--rss-max-seconds", type=float, default=900)
    p.add_argument("--wrk-seconds", type=int, default=5, help="0: no wrk cross-check")
    p.add_argument("--max-seconds", type=float, default=120, help="bound of each load run")
    p.add_argument(
        "--only",
        default="direct,kiban-1,kiban-N,litellm,vllm-router",
        help="comma-separated targets",
    )
    p.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs")
    p.add_argument(
        "--kiban-strategy",
        default="",
        help="comma-separated route strategies: kiban measured once per strategy",
    )
    p.add_argument("--kiban-engines", type=int, default=2, help="engines of that route")
    p.add_argument("--prefixes", type=int, default=0, help="distinct prompts sent in turn")
    p.add_argument("--prefix-bytes", type=int, default=4096, help="size of each prompt")
    p.add_argument("--rounds", type=int, default=1, help="measure the targets N times")
    p.add_argument("--no-stream", action="store_true", help="non-streaming runs only")
    p.add_argument("--profile", action="store_true", help="py-spy kiban (1 worker)")
    p.add_argument("--profile-native", action="store_true", help="py-spy --native (slower)")
    p.add_argument("--profile-requests", type=int, default=20000)
    p.add_argument("--profile-top", type=int, default=25)
    p.add_argument("--output", type=Path, default=REPO / "bench" / "results" / "latest.json")
    p.add_argument("--keep", action="store_true", help="keep the work folder (configs, logs)")
    p.add_argument("--markdown", action="store_true", help="also print the table as Markdown")
    p.add_argument(
        "--from-json", type=Path, help="print the report of an earlier run's JSON; run nothing"
    )
    return p.parse_args()


def main() -> None:
    args = parse_args()
    if args.from_json is not None:
        document = json.loads(args.from_json.read_text())
        saved = argparse.Namespace(**document["settings"])
        saved.output, saved.markdown = args.from_json, args.markdown
        report(document, document["rows"], document["targets"], saved)
        return
    require_tools("wrk", "taskset")
    targets.nginx_binary()
    stop_on_sigterm()  # the finally blocks stop the engines
    place = Placement(pin=not args.no_pin)
    chosen = [t.strip() for t in args.only.split(",") if t.strip()]
    gateways: dict[str, targets.Gateway | None] = {"direct": None}
    strategies = [s.strip() for s in args.kiban_strategy.split(",") if s.strip()]
    kibans: dict[str, list[targets.Gateway]] = {
        "kiban-1": [targets.kiban(1, s, args.kiban_engines) for s in strategies]
        or [targets.kiban(1)],
        "kiban-N": [targets.kiban(args.workers, s, args.kiban_engines) for s in strategies]
        or [targets.kiban(args.workers)],
    }
    gateways["kiban-1"] = kibans["kiban-1"][0]
    gateways["kiban-N"] = kibans["kiban-N"][0]
    gateways["litellm"] = targets.litellm()
    gateways["vllm-router"] = targets.vllm_router()
    unknown = [t for t in chosen if t not in gateways]
    if unknown:
        raise SystemExit(f"--only: unknown targets {unknown}; expected some of {list(gateways)}")
    for key in ("litellm", "vllm-router"):  # install before anything runs
        if key in chosen:
            targets.ensure_venv(
                *{
                    "litellm": ("litellm-1.100.5", targets.LITELLM),
                    "vllm-router": ("vllm-router-0.1.17", targets.VLLM_ROUTER),
                }[key]
            )

    work = Path(tempfile.mkdtemp(prefix="kiban-bench-"))
    live: list[Service] = []
    started = time.time()
    info = machine()
    rows: list[dict[str, Any]] = []
    try:
        nginx, nginx_url = targets.nginx(work, place.engine)
        sse, sse_url = targets.sse_upstream(work, place.engine, args.stream_tokens)
        paced, paced_url = targets.sse_upstream(
            work, place.engine, args.ttft_tokens, args.ttft_interval
        )
        live += [nginx.start(), sse.start(), paced.start()]
        nginx.wait_ready(nginx_url + CHAT, _READY_BODY)
        sse.wait_ready(sse_url + CHAT, _READY_BODY)
        paced.wait_ready(paced_url + CHAT, _READY_BODY)
        loads = Loads(args, place, work)
        runs = [(k, g) for k in chosen for g in kibans.get(k, [gateways[k]])]
        for round_ in range(1, args.rounds + 1):
            # every other round in reverse, so what runs first (or last) in a round is no bias
            for key, gateway in runs if round_ % 2 else runs[::-1]:
                label = "direct to the upstream" if gateway is None else gateway.label
                key = gateway.key if gateway else key
                if args.rounds > 1:
                    label += f" (round {round_})"
                console.print(f"[bold]{label}[/]: non-streaming")
                row: dict[str, Any] = {"key": key, "label": label, "loadavg_1min": _loadavg()}
                row["round"] = round_
                row["nonstream"] = measure_nonstream(
                    gateway, args, loads, work, nginx_url, place, live, rss_check=key == "kiban-1"
                )
                if not args.no_stream:
                    console.print(f"[bold]{label}[/]: streaming")
                    row["stream"] = measure_stream(
                        gateway, args, loads, work, sse_url, paced_url, place, live
                    )
                rows.append(row)
    finally:
        for service in reversed(live):
            service.stop()
        if args.keep:
            console.print(f"configs and logs kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)

    derive(rows)
    info["loadavg_end"] = Path("/proc/loadavg").read_text().split()[:3]
    checks = target_checks(rows, args)
    document = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "seconds": round(time.time() - started, 1),
        "machine": info,
        "placement": place.describe(),
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "rows": rows,
        "targets": checks,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(document, indent=2) + "\n")
    report(document, rows, checks, args)


def report(
    document: dict[str, Any],
    rows: list[dict[str, Any]],
    checks: list[dict[str, Any]],
    args: argparse.Namespace,
) -> None:
    out = Console(width=200)
    m = document["machine"]
    out.print(
        f"{m['cpus']} x {m['cpu']}, {m['memory_gib']} GiB, Linux {m['kernel']}, "
        f"Python {m['python']}, {m['nginx']}, {m['wrk']}; load average "
        f"{' '.join(m['loadavg_start'])} at start, {' '.join(m['loadavg_end'])} at the end; "
        f"{document['placement']}",
        highlight=False,
    )
    out.print(table(rows, args))
    k1 = next((r for r in rows if r["key"] == "kiban-1"), None)
    rss0 = _get(k1, "nonstream", "rss_after_1000") if k1 else None
    if rss0:
        rss1 = k1["nonstream"]["rss_after_all"]
        out.print(
            f"kiban, 1 worker, RSS: {rss0 / 2**20:.1f} MiB after 1,000 requests, "
            f"{rss1 / 2**20:.1f} MiB after {k1['nonstream']['rss_requests']:,} "
            f"({(rss1 - rss0) / 2**20:+.1f} MiB)",
            highlight=False,
        )
    direct = next((r for r in rows if r["key"] == "direct"), None)
    if direct and _get(direct, "nonstream", "wrk"):
        kb, wrk = direct["nonstream"]["c8"], direct["nonstream"]["wrk"]
        out.print(
            f"load generators on nginx direct, {args.connections} connections, one core: "
            f"kiban bench {kb['requests_per_s']:,.0f} req/s at "
            f"{kb['client_cpu_us_per_request']:.1f} µs CPU/request; wrk "
            f"{wrk['requests_per_s']:,.0f} req/s at {wrk['client_cpu_us_per_request']:.1f} µs "
            "CPU/request",
            highlight=False,
        )
    for c in checks:
        mark = "[green]met[/]" if c["ok"] else "[red]not met[/]"
        out.print(f"target {c['target']}: {c['measured']:.3g}{c['unit']} {mark}")
    profile_ = _get(k1, "nonstream", "profile") if k1 else None
    if profile_ and profile_.get("self"):
        out.print(f"py-spy, kiban 1 worker, non-streaming ({profile_['samples']:,} samples):")
        for frame, share in profile_["self"]:
            out.print(f"  {share:5.1f}%  {frame}", highlight=False, markup=False)
        by_package = profile_.get("self_by_package", [])
        packages = ", ".join(f"{p} {share:.1f}%" for p, share in by_package)
        if packages:
            out.print(f"  self time by package: {packages}", highlight=False, markup=False)
    for line in strategy_summary(rows):
        out.print(line, highlight=False)
    out.print(f"JSON: {args.output}", highlight=False)
    if getattr(args, "markdown", False):
        print(markdown(rows))


def strategy_summary(rows: list[dict[str, Any]]) -> list[str]:
    """kiban's CPU per request for each route strategy over the rounds (paired_summary)."""
    cpu: dict[str, dict[int, float]] = {}
    for row in rows:
        value = _get(row, "nonstream", "cpu_us_per_request")
        if row["key"].startswith("kiban-") and "-" in row["key"][6:] and value is not None:
            cpu.setdefault(row["key"], {})[row.get("round", 1)] = value
    if len(cpu) < 2:
        return []
    return ["CPU µs per request by route strategy", *paired_summary(cpu)]


def paired_summary(cpu: dict[str, dict[int, float]]) -> list[str]:
    """Per key, its values by round: mean and spread, and the paired difference to the
    first key (same round): mean, median, spread."""
    first = next(iter(cpu))
    lines = [f"(mean, min-max over rounds; vs {first})"]
    for key, by_round in cpu.items():
        values = list(by_round.values())
        line = f"  {key}: {statistics.mean(values):.1f} ({min(values):.1f}-{max(values):.1f})"
        diffs = [v - cpu[first][r] for r, v in by_round.items() if r in cpu[first]]
        if key != first and diffs:
            line += (
                f"; difference mean {statistics.mean(diffs):+.1f} µs, "
                f"median {statistics.median(diffs):+.1f} "
                f"({min(diffs):+.1f} to {max(diffs):+.1f}, {len(diffs)} rounds)"
            )
        lines.append(line)
    return lines


def markdown(rows: list[dict[str, Any]]) -> str:
    """The table's figures as a Markdown table (docs/benchmarks.md)."""
    head = (
        "| target | req/s | p50 ms | p99 ms | +p50 ms, 1 conn | +p99 ms, 1 conn | CPU µs/req "
        "| wrk req/s | streams/s | chunks/s | +TTFT ms, 1 conn | CPU µs/chunk | errors |"
    )
    lines = [head, "| --- |" + " ---: |" * 12]
    for row in rows:
        lines.append("| " + " | ".join(_cells(row)) + " |")
    return "\n".join(lines)


def _cells(row: dict[str, Any]) -> list[str]:
    streams = _get(row, "stream", "c8")
    chunks_per_s = None
    if streams and streams["duration_s"]:
        chunks_per_s = streams["stream_events"] / streams["duration_s"]
    return [
        row["label"],
        _num(_get(row, "nonstream", "c8", "requests_per_s")),
        _ms(_get(row, "nonstream", "c8", "latency_ms", "p50")),
        _ms(_get(row, "nonstream", "c8", "latency_ms", "p99")),
        _ms(row["added_p50_ms_c1"], signed=True),
        _ms(row["added_p99_ms_c1"], signed=True),
        _num(_get(row, "nonstream", "cpu_us_per_request"), 1),
        _num(_get(row, "nonstream", "wrk", "requests_per_s")),
        _num(_get(row, "stream", "c8", "requests_per_s"), 1),
        _num(chunks_per_s),
        _ms(row["added_ttft_p50_ms_c1"], signed=True),
        _num(_get(row, "stream", "cpu_us_per_chunk"), 2),
        str(row["errors"]),
    ]


if __name__ == "__main__":
    main()
