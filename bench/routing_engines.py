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
import re
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from procs import Service, free_port, stop_on_sigterm

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
    # later turns of a chat: on the engine of its previous turn or not; and of those that
    # stayed, the ones the engine answered with under half of the prompt from its cache
    # (its slot had been given to another chat: the engine's eviction, not the routing)
    stayed: int = 0
    moved: int = 0
    stayed_uncached: int = 0
    engines: dict[str, int] = field(default_factory=dict)

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
            "turns_stayed": self.stayed,
            "turns_moved": self.moved,
            "stayed_uncached": self.stayed_uncached,
            "engines": dict(sorted(self.engines.items())),
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
    previous: str | None = None,
) -> tuple[str, str | None]:
    """One streamed chat request; returns the answer's text and the engine that answered.

    *previous*: the engine of the chat's previous turn (None for a first turn)."""
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
    prompt = cached = 0
    try:
        async with http.post(
            f"{url}/v1/chat/completions", json=payload, headers={"X-Session-ID": session}
        ) as resp:
            resp.raise_for_status()
            engine = resp.headers.get("x-kiban-engine")
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
                    prompt = usage.get("prompt_tokens", 0)
                    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
    except (aiohttp.ClientError, TimeoutError):
        out.failures += 1
        return "...", None
    out.ttft_s.append((first or time.perf_counter()) - start)
    out.prompt_tokens += prompt
    out.cached_tokens += cached
    if engine:
        out.engines[engine] = out.engines.get(engine, 0) + 1
    if previous is not None and engine:
        if engine != previous:
            out.moved += 1
        else:
            out.stayed += 1
            out.stayed_uncached += cached < prompt / 2
    return "".join(answer) or "...", engine


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
            engine: str | None = None
            for turn in range(args.turns):
                history.append({"role": "user", "content": f"Turn {turn}: " + _text(rng, 200)})
                answer, engine = await _one(http, url, history, f"{tag}-{n}", args, out, engine)
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


_SAMPLE = re.compile(r"^([a-z_:]+)(?:\{([^}]*)\})? ([0-9.e+-]+)$")


async def _counters(url: str, names: tuple[str, ...]) -> dict[str, float]:
    """The samples of *names* on *url*/metrics, keyed ``name{labels}``."""
    async with aiohttp.ClientSession() as http, http.get(f"{url}/metrics") as resp:
        text = await resp.text()
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if m and m.group(1) in names:
            labels = re.sub(r',?route="[^"]*"', "", m.group(2) or "").strip(",")
            out[m.group(1) + (f"{{{labels}}}" if labels else "")] = float(m.group(3))
    return out


def _delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: v - before.get(k, 0.0) for k, v in after.items() if v - before.get(k, 0.0)}


_KIBAN = ("kiban_route_affinity_decisions_total",)
_LLAMA = ("llamacpp:prompt_tokens_total", "llamacpp:n_decode_total")


def _table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| strategy | workload | round | requests | failed | req/s | TTFT p50 ms | TTFT p99 ms | "
        "prompt tokens from cache | later turns moved / stayed (stayed, engine evicted) | "
        "requests per engine | kiban decisions |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |",
    ]
    for r in rows:
        decisions = ", ".join(
            f"{k.split('outcome=')[-1].strip(chr(34) + '}')} {v:.0f}"
            for k, v in r.get("decisions", {}).items()
        )
        engines = " / ".join(str(n) for n in r["engines"].values())
        lines.append(
            f"| {r['strategy']} | {r['workload']} | {r.get('round', 1)} | {r['requests']} | "
            f"{r['failures']} | {r['req_per_s']:.2f} | {r['ttft_p50_ms']:.0f} | "
            f"{r['ttft_p99_ms']:.0f} | {100 * r['cached_share']:.1f} % | "
            f"{r['turns_moved']} / {r['turns_stayed']} ({r['stayed_uncached']}) | {engines} | "
            f"{decisions or '-'} |"
        )
    return "\n".join(lines)


def _measure(
    url: str,
    engines: list[str],
    run: Any,
    args: argparse.Namespace,
    strategy: str,
    workload: str,
    round_: int,
) -> dict[str, Any]:
    """One workload through one gateway, with kiban's decisions and the engines' counters."""

    async def measured() -> dict[str, Any]:
        kiban0 = await _counters(url, _KIBAN)
        llama0 = [await _counters(e, _LLAMA) for e in engines]
        outcome = await run(url, args, f"{strategy}-{workload}-{round_}")
        row = outcome.row(strategy, workload)
        row["round"] = round_
        row["decisions"] = _delta(await _counters(url, _KIBAN), kiban0)
        row["engine_counters"] = [
            _delta(await _counters(e, _LLAMA), before)
            for e, before in zip(engines, llama0, strict=True)
        ]
        return row

    return asyncio.run(measured())


def _summary(rows: list[dict[str, Any]]) -> list[str]:
    """TTFT p50 of each strategy and workload over the rounds, and its paired change
    against least_outstanding in the same round."""
    cells: dict[tuple[str, str], dict[int, float]] = {}
    for r in rows:
        cells.setdefault((r["strategy"], r["workload"]), {})[r["round"]] = r["ttft_p50_ms"]
    lines = []
    for (strategy, workload), by_round in cells.items():
        values = list(by_round.values())
        line = (
            f"{strategy} {workload}: TTFT p50 mean {statistics.mean(values):.0f} ms "
            f"({min(values):.0f}-{max(values):.0f}, {len(values)} rounds)"
        )
        base = cells.get(("least_outstanding", workload))
        if base and strategy != "least_outstanding":
            change = [100 * (v / base[r] - 1) for r, v in by_round.items() if r in base]
            if change:
                line += (
                    f"; vs least_outstanding {statistics.mean(change):+.0f} % "
                    f"({min(change):+.0f} to {max(change):+.0f})"
                )
        lines.append(line)
    return lines


def main() -> None:
    stop_on_sigterm()
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
    parser.add_argument("--workloads", default="multi-turn,control")
    parser.add_argument(
        "--rounds", type=int, default=1, help="repeat the strategies N times, interleaved"
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="kiban-routing-bench-") as tmp:
        work = Path(tmp)
        servers = _llama_servers(work, _gguf(args.model), args)
        try:
            engines = [u for _, u in servers]
            workloads = {"multi-turn": multi_turn, "control": control}
            for round_ in range(1, args.rounds + 1):
                for strategy in args.strategies.split(","):
                    gateway, url = _gateway(work, strategy, engines, args.balance_abs)
                    try:
                        for name in args.workloads.split(","):
                            rows.append(_measure(url, engines, workloads[name], args, strategy,
                                                 name, round_))  # fmt: skip
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
    for line in _summary(rows):
        print(line)


if __name__ == "__main__":
    main()
