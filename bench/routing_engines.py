"""Routing strategies on two real llama-servers with the prompt cache on: hits, TTFT, req/s.

Two llama-servers (one core each; llama-server caches prompts by default)
serve one model behind kiban; for each strategy a fresh gateway runs two
workloads with ``--workers`` concurrent clients:

- multi-turn: ``--conversations`` chats of ``--turns`` turns, each turn
  re-sending the whole history (a system prompt of ``--system-bytes`` and the
  answers so far) with its chat id in ``X-Session-ID``;
- control: as many requests of the same sizes, each with a prompt of its own
  (no shared prefix).

``--think-s N`` makes each client pause up to N s after an answer, as a user
reading it would. Without it the clients are closed loops, and
``least_outstanding`` itself keeps most chats on one engine: the engine that
just answered a client is the least loaded when that client's next turn
arrives.

By default each engine caches only what its ``--parallel`` slots hold
(``--cache-ram 0``), as KV memory bounds a GPU engine's cache: llama.cpp's
default also keeps up to 8 GiB of prompts in host RAM, which for the tiny
model holds every conversation of the run on every engine.

Every request streams; TTFT is the time to the first content chunk as the
client sees it. Prefix-cache hits are the engines' own count: llama.cpp's
``usage.prompt_tokens_details.cached_tokens`` of each answer, summed over the
prompt tokens. Run it under the shared lock:

    flock /tmp/kiban-heavy.lock .venv/bin/python bench/routing_engines.py \\
        [--model tiny|smollm2] [--conversations 16] [--turns 6] [--workers 8] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from procs import Service, free_port

from kiban.deploy.envs import ensure_engine_env, llama_server_binary

STRATEGIES = ("round_robin", "least_outstanding", "cache_aware", "session")
WORDS = [
    "alpha",
    "beta",
    "gamma",
    "delta",
    "epsilon",
    "zeta",
    "theta",
    "kappa",
    "lambda",
    "sigma",
    "omega",
]


@dataclass
class Outcome:
    ttft_s: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    cached_tokens: int = 0
    failures: int = 0
    wall_s: float = 0.0

    def row(self, strategy: str, workload: str) -> dict[str, Any]:
        done = len(self.ttft_s)
        ttft = sorted(self.ttft_s)
        return {
            "strategy": strategy,
            "workload": workload,
            "requests": done,
            "failures": self.failures,
            "req_per_s": done / self.wall_s if self.wall_s else 0.0,
            "ttft_p50_ms": 1000 * statistics.median(ttft) if ttft else None,
            "ttft_p99_ms": 1000 * ttft[min(len(ttft) - 1, int(0.99 * len(ttft)))] if ttft else None,
            "cached_share": self.cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0,
        }


def _text(rng: random.Random, size: int) -> str:
    words: list[str] = []
    length = 0
    while length < size:
        word = rng.choice(WORDS) + str(rng.randrange(1000))
        words.append(word)
        length += len(word) + 1
    return " ".join(words)


async def _one(
    http: aiohttp.ClientSession,
    url: str,
    messages: list[dict[str, str]],
    session: str,
    args: argparse.Namespace,
    out: Outcome,
) -> str:
    """One streamed chat request; returns the answer's text."""
    payload = {
        "model": "bench",
        "messages": messages,
        "max_tokens": args.max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    first: float | None = None
    answer: list[str] = []
    try:
        async with http.post(
            f"{url}/v1/chat/completions", json=payload, headers={"X-Session-ID": session}
        ) as resp:
            resp.raise_for_status()
            async for line in resp.content:
                if not line.startswith(b"data: {"):
                    continue
                event = json.loads(line[6:])
                for choice in event.get("choices") or []:
                    text = (choice.get("delta") or {}).get("content")
                    if text:
                        first = first or time.perf_counter()
                        answer.append(text)
                usage = event.get("usage")
                if usage:
                    out.prompt_tokens += usage.get("prompt_tokens", 0)
                    details = usage.get("prompt_tokens_details") or {}
                    out.cached_tokens += details.get("cached_tokens", 0)
    except (aiohttp.ClientError, TimeoutError):
        out.failures += 1
        return "..."
    out.ttft_s.append((first or time.perf_counter()) - start)
    return "".join(answer) or "..."


async def multi_turn(url: str, args: argparse.Namespace, tag: str) -> Outcome:
    out = Outcome()
    rng = random.Random(f"multi-{tag}")
    chats = list(range(args.conversations))
    systems = {n: f"[{tag} chat {n}] " + _text(rng, args.system_bytes) for n in chats}
    queue: asyncio.Queue[int] = asyncio.Queue()
    for n in chats:
        queue.put_nowait(n)

    async def worker(http: aiohttp.ClientSession) -> None:
        while not queue.empty():
            n = queue.get_nowait()
            history = [{"role": "system", "content": systems[n]}]
            for turn in range(args.turns):
                history.append({"role": "user", "content": f"Turn {turn}: " + _text(rng, 200)})
                answer = await _one(http, url, history, f"{tag}-{n}", args, out)
                history.append({"role": "assistant", "content": answer})
                await asyncio.sleep(rng.uniform(0, args.think_s))  # the user reads, then types

    start = time.perf_counter()
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        await asyncio.gather(*(worker(http) for _ in range(args.workers)))
    out.wall_s = time.perf_counter() - start
    return out


async def control(url: str, args: argparse.Namespace, tag: str) -> Outcome:
    """The same request count and sizes, every prompt different from its first byte."""
    out = Outcome()
    rng = random.Random(f"control-{tag}")
    sizes = [
        args.system_bytes + turn * (200 + 8 * args.max_tokens)
        for _ in range(args.conversations)
        for turn in range(args.turns)
    ]
    queue: asyncio.Queue[int] = asyncio.Queue()
    for size in sizes:
        queue.put_nowait(size)

    async def worker(http: aiohttp.ClientSession) -> None:
        while not queue.empty():
            size = queue.get_nowait()
            messages = [
                {"role": "system", "content": f"{rng.random()} " + _text(rng, size)},
                {"role": "user", "content": "Go on."},
            ]
            await _one(http, url, messages, f"{tag}-{rng.random()}", args, out)
            await asyncio.sleep(rng.uniform(0, args.think_s))

    start = time.perf_counter()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as http:
        await asyncio.gather(*(worker(http) for _ in range(args.workers)))
    out.wall_s = time.perf_counter() - start
    return out


def _gguf(model: str) -> Path:
    if model == "smollm2":
        from kiban.models.smollm2 import ensure_smollm2_gguf

        return ensure_smollm2_gguf(progress=print)
    from kiban.models.tiny import build_tiny_gguf

    path = Path(tempfile.gettempdir()) / "kiban-bench-tiny-qwen2.gguf"
    return path if path.exists() else build_tiny_gguf(path, seed=0)


def _llama_servers(work: Path, gguf: Path, args: argparse.Namespace) -> list[tuple[Service, str]]:
    binary = llama_server_binary(ensure_engine_env("llamacpp-cpu", progress=print))
    servers = []
    for i in range(2):
        port = free_port()
        argv = [str(binary), "--model", str(gguf), "--alias", "bench", "--host", "127.0.0.1",
                "--port", str(port), "-c", str(args.ctx), "-np", str(args.parallel),
                "-ngl", "0", "-t", "1", "--metrics",
                "--cache-ram", str(args.cache_ram)]  # fmt: skip
        service = Service(f"llama-{i}", argv, work / f"llama-{i}.log", cpus=str(i % 2))
        servers.append((service.start(), f"http://127.0.0.1:{port}"))
    for service, url in servers:
        service.wait_ready(f"{url}/health", timeout_s=120)
    return servers


def _gateway(
    work: Path, strategy: str, engines: list[str], balance_abs: int | None
) -> tuple[Service, str]:
    port = free_port()
    config = {
        "gateway": {"host": "127.0.0.1", "port": port, "request_log": False},
        "engines": [
            {"name": f"e{i}", "kind": "llamacpp", "url": url, "models": ["bench"]}
            for i, url in enumerate(engines)
        ],
        "routes": [{"model": "bench", "engines": ["e0", "e1"], "strategy": strategy}],
    }
    if strategy == "cache_aware" and balance_abs is not None:
        config["routes"][0]["cache_aware"] = {"balance_abs": balance_abs}
    path = work / f"kiban-{strategy}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    argv = [str(Path(sys.executable).with_name("kiban")), "serve", "-c", str(path),
            "--log-level", "warning"]  # fmt: skip
    service = Service(f"kiban-{strategy}", argv, work / f"kiban-{strategy}.log").start()
    service.wait_ready(f"http://127.0.0.1:{port}/ready", timeout_s=60)
    return service, f"http://127.0.0.1:{port}"


def _table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| strategy | workload | requests | failed | req/s | TTFT p50 ms | TTFT p99 ms | "
        "prompt tokens from cache |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['strategy']} | {r['workload']} | {r['requests']} | {r['failures']} | "
            f"{r['req_per_s']:.2f} | {r['ttft_p50_ms']:.0f} | {r['ttft_p99_ms']:.0f} | "
            f"{100 * r['cached_share']:.1f} % |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=("tiny", "smollm2"), default="tiny")
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    parser.add_argument("--conversations", type=int, default=16)
    parser.add_argument("--turns", type=int, default=6)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--system-bytes", type=int, default=3000)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--ctx", type=int, default=32768)
    parser.add_argument("--parallel", type=int, default=4)
    parser.add_argument(
        "--think-s", type=float, default=0.0, help="pause after each answer, uniform 0..N s"
    )
    parser.add_argument(
        "--cache-ram",
        type=int,
        default=0,
        help="llama-server's host-RAM prompt cache in MiB (0: only what its slots hold)",
    )
    parser.add_argument(
        "--balance-abs", type=int, default=None, help="cache_aware's balance_abs (default: its own)"
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="kiban-routing-bench-") as tmp:
        work = Path(tmp)
        servers = _llama_servers(work, _gguf(args.model), args)
        try:
            for strategy in args.strategies.split(","):
                gateway, url = _gateway(work, strategy, [u for _, u in servers], args.balance_abs)
                try:
                    for name, run in (("multi-turn", multi_turn), ("control", control)):
                        outcome = asyncio.run(run(url, args, f"{strategy}-{name}"))
                        rows.append(outcome.row(strategy, name))
                        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
                finally:
                    gateway.stop()
        finally:
            for service, _ in servers:
                service.stop()
    if args.json:
        print(json.dumps({"args": vars(args), "rows": rows}))
        return
    print(f"# {args.model} on two llama-servers (1 thread each, -np {args.parallel}), "
          f"--cache-ram {args.cache_ram}, {args.conversations} chats x {args.turns} turns, "
          f"think {args.think_s:g} s, cache_aware balance_abs {args.balance_abs or 'default'}, "
          f"{args.workers} clients, "
          f"{platform.machine()}")  # fmt: skip
    print(_table(rows))


if __name__ == "__main__":
    main()
