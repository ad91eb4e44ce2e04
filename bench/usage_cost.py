"""Cost of usage per API key on the request path, in CPU ns, and of one flush to SQLite.

Per request: ``Usage.record`` (the key's Prometheus series and its (key, hour)
cell in memory), in one process and in multiprocess mode (``--workers N``,
values in mmap files). Per stream: ``ask_for_usage`` (``include_usage``
spliced into the body) and ``EventStream(drop_usage=True).feed`` over a stream's chunks
(130 content events, then the usage event and ``[DONE]``); the same with vLLM's usage
on every content event (``continuous_usage_stats``, asked for a stream kiban may
continue) read and taken off each event. Off the path: one
flush of *keys* key-hours to a fresh SQLite file.

    .venv/bin/python bench/usage_cost.py [--requests 200000] [--repeats 5] [--keys 100]

Times are CPU time of the process (``time.process_time_ns``); the best of the
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
from pathlib import Path

CHUNK = b'data: {"id":"c","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"word"}}]}\n\n'  # noqa: E501
USAGE = b'data: {"id":"c","choices":[],"usage":{"prompt_tokens":31,"completion_tokens":130}}\n\n'
DONE = b"data: [DONE]\n\n"
#: a content event with vLLM 0.32's usage so far (continuous_usage_stats)
COUNTED = (
    b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"m",'
    b'"choices":[{"index":0,"delta":{"content":"word"},"logprobs":null,"finish_reason":null,'
    b'"token_ids":null}],"usage":{"prompt_tokens":31,"total_tokens":99,"completion_tokens":68,'
    b'"completion_tokens_details":null}}\n\n'
)
BODY = b'{"model":"m","stream":true,"messages":[{"role":"user","content":"' + b"x" * 400 + b'"}]}'


def _exchange():
    from kiban.gateway.proxy import Exchange

    ex = Exchange(
        request_id="r", endpoint="chat", body=BODY, payload={}, model="m", stream=True,
        client_headers=[],
    )  # fmt: skip
    ex.engine, ex.status, ex.chunks = "engine-a", 200, 130
    ex.usage = {"prompt_tokens": 31, "completion_tokens": 130, "total_tokens": 161}
    return ex


def _record(n: int) -> float:
    from kiban.gateway.metrics import Metrics
    from kiban.gateway.usage import Usage

    usage = Usage(Metrics().registry)
    ex = _exchange()
    usage.record("alice", ex, 100)  # bind the children
    start = time.process_time_ns()
    for _ in range(n):
        usage.record("alice", ex, 100)
    return (time.process_time_ns() - start) / n


def _splice(n: int) -> float:
    import orjson

    from kiban.gateway.stream_usage import ask_for_usage

    parsed = orjson.loads(BODY)
    start = time.process_time_ns()
    for _ in range(n):
        ask_for_usage(dict(parsed), BODY)
    return (time.process_time_ns() - start) / n


def _drop(n: int) -> float:
    from kiban.gateway.sse import EventStream

    chunks = [CHUNK] * 130 + [USAGE + DONE]
    streams = max(1, n // 100)
    start = time.process_time_ns()
    for _ in range(streams):
        events = EventStream(drop_usage=True)
        for chunk in chunks:
            events.feed(chunk)
    return (time.process_time_ns() - start) / streams


def _counted(n: int, strip: bool) -> float:
    from kiban.gateway.sse import EventStream

    chunks = [COUNTED] * 130 + [USAGE + DONE]
    streams = max(1, n // 100)
    start = time.process_time_ns()
    for _ in range(streams):
        events = EventStream(count=("usage", "completion_tokens"), strip=strip, drop_usage=True)
        for chunk in chunks:
            events.feed(chunk)
    return (time.process_time_ns() - start) / streams


def measure(requests: int, repeats: int) -> dict[str, float]:
    results = {"Usage.record, per request": min(_record(requests) for _ in range(repeats))}
    results["ask_for_usage, per stream"] = min(_splice(requests) for _ in range(repeats))
    results["drop_usage over 131 chunks, per stream"] = min(_drop(requests) for _ in range(repeats))
    for strip, name in ((False, "passed"), (True, "taken off")):
        results[f"vLLM per-event usage {name}, per stream"] = min(
            _counted(requests, strip) for _ in range(repeats)
        )
    return {k: round(v, 1) for k, v in results.items()}


def flush_ms(keys: int, repeats: int) -> float:
    from kiban.gateway.usage_store import SqliteUsage, hour_of

    hour = hour_of(time.time())
    batch = {(f"key-{i}", hour): [10, 3100, 13000] for i in range(keys)}
    best = float("inf")
    for _ in range(repeats):
        with tempfile.TemporaryDirectory(prefix="kiban-bench-usage-") as tmp:
            db = SqliteUsage(Path(tmp) / "usage.sqlite")
            db.add(batch)  # create the file and table
            start = time.perf_counter()
            db.add(batch)
            best = min(best, time.perf_counter() - start)
    return round(best * 1000, 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--keys", type=int, default=100, help="key-hours in the flushed batch")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.requests, args.repeats)))
        return
    modes: dict[str, dict[str, float]] = {}
    for mode in ("one process", "multiprocess"):
        env = dict(os.environ)
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        with tempfile.TemporaryDirectory(prefix="kiban-bench-usage-") as tmp:
            if mode == "multiprocess":
                env["PROMETHEUS_MULTIPROC_DIR"] = tmp
            argv = [sys.executable, __file__, "--child", f"--requests={args.requests}"]
            out = subprocess.run(
                [*argv, f"--repeats={args.repeats}"],
                env=env,
                check=True,
                capture_output=True,
                text=True,
            ).stdout
        modes[mode] = json.loads(out)
    print(
        f"usage per key, CPU ns (best of {args.repeats}; Python {platform.python_version()}, "
        f"{platform.machine()}, {os.cpu_count()} CPUs)"
    )
    print(f"{'path':<38}{'one process':>14}{'multiprocess':>14}")
    for key in modes["one process"]:
        print(f"{key:<38}{modes['one process'][key]:>14.0f}{modes['multiprocess'][key]:>14.0f}")
    print(f"one flush of {args.keys} key-hours to SQLite: {flush_ms(args.keys, args.repeats)} ms")


if __name__ == "__main__":
    main()
