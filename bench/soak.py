"""A bounded soak: steady traffic through kiban to real engines, with engine restarts.

`kiban up` runs vLLM's CPU build and llama.cpp's llama-server on the tiny
local models behind one route; an open-loop client sends ``--rate``
requests a second (half of them streamed) for ``--duration`` seconds; every
``--restart-every`` seconds one engine is killed by PID (SIGKILL, as a crash)
and the supervisor restarts it. Every ``--sample-every`` seconds it records
requests and errors (by kind) and the resident memory of the gateway and of
each engine (whole process group). It prints a table and a summary, writes
them as JSON with ``--json``, and stops everything it started.

    .venv/bin/python bench/soak.py                      # 20 minutes at 4 req/s
    .venv/bin/python bench/soak.py --duration 240 --restart-every 80   # a short one
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import aiohttp
import yaml

from kiban.models.tiny import build_tiny_gguf, build_tiny_model
from kiban.processes import group_members
from kiban.run_state import RunDir

KIBAN = Path(sys.executable).with_name("kiban")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _config(work: Path) -> dict:
    models = work / "models"
    if not (models / "tiny-qwen2").exists():
        build_tiny_model(models / "tiny-qwen2", seed=0)
    if not (models / "tiny-qwen2.gguf").exists():
        build_tiny_gguf(models / "tiny-qwen2.gguf", seed=0)

    def engine(name: str, kind: str, model: str, concurrency: int, memory: int) -> dict:
        launch = {
            "model": str(models / model),
            "device": "cpu",
            "port": _free_port(),
            "context": 2048,
            "concurrency": concurrency,
            "gpu_memory_gib": memory,
        }
        return {"name": name, "kind": kind, "models": ["tiny"], "launch": launch}

    return {
        "gateway": {"port": _free_port(), "health_interval_s": 1},
        "engines": [
            engine("vllm-cpu", "vllm", "tiny-qwen2", 8, 3),
            engine("llama-cpu", "llamacpp", "tiny-qwen2.gguf", 2, 1),
        ],
        "routes": [
            {
                "model": "tiny",
                "engines": ["vllm-cpu", "llama-cpu"],
                "strategy": "least_outstanding",
            }
        ],
    }


def _rss_mib(pid: int | None) -> float:
    """Resident memory of *pid*'s process group (the engine and its workers), in MiB."""
    if pid is None:
        return 0.0
    total = 0
    for member in group_members(pid) or {pid}:
        try:
            for line in Path(f"/proc/{member}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total / 1024


class Soak:
    def __init__(self, args: argparse.Namespace, config_path: Path, base_url: str) -> None:
        self.args = args
        self.run_dir = RunDir(config_path)
        self.url = base_url + "/v1/chat/completions"
        self.outcomes: Counter[str] = Counter()
        self.samples: list[dict] = []
        self.restarts: list[tuple[float, str]] = []
        self.in_flight: set[asyncio.Task[None]] = set()

    def _pids(self) -> dict[str, int | None]:
        state = self.run_dir.read()
        pids = {name: rec.pid for name, rec in state.engines.items()} if state else {}
        pids["gateway"] = state.gateway.pid if state and state.gateway else None
        return pids

    async def _one(self, session: aiohttp.ClientSession, i: int) -> None:
        stream = i % 2 == 1
        body = {
            "model": "tiny",
            "messages": [{"role": "user", "content": f"soak {i}"}],
            "max_tokens": 16,
            "stream": stream,
        }
        try:
            async with session.post(self.url, json=body) as resp:
                data = await resp.read()
            if resp.status != 200:
                self.outcomes[f"http_{resp.status}"] += 1
            elif stream and not data.rstrip().endswith(b"data: [DONE]"):
                self.outcomes["stream_error_event"] += 1
            else:
                self.outcomes["ok"] += 1
        except (aiohttp.ClientError, TimeoutError) as exc:
            self.outcomes[type(exc).__name__] += 1

    def _sample(self, elapsed: float) -> None:
        pids = self._pids()
        sample = {
            "t_s": round(elapsed),
            **{k: v for k, v in sorted(self.outcomes.items())},
            **{f"rss_{name}_mib": round(_rss_mib(pid), 1) for name, pid in pids.items()},
        }
        self.samples.append(sample)
        print(json.dumps(sample), flush=True)

    def _restart_one(self, elapsed: float) -> None:
        engines = [n for n in self._pids() if n != "gateway"]
        name = engines[len(self.restarts) % len(engines)]
        pid = self._pids().get(name)
        if pid:
            os.kill(pid, signal.SIGKILL)
            self.restarts.append((round(elapsed), name))
            print(f"# t={elapsed:.0f}s killed {name} (PID {pid}); the supervisor restarts it")

    async def run(self) -> None:
        a = self.args
        timeout = aiohttp.ClientTimeout(total=120)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            started = time.monotonic()
            next_sample, next_restart, i = 0.0, a.restart_every, 0
            while (elapsed := time.monotonic() - started) < a.duration:
                if elapsed >= next_sample:
                    self._sample(elapsed)
                    next_sample += a.sample_every
                if a.restart_every and elapsed >= next_restart:
                    self._restart_one(elapsed)
                    next_restart += a.restart_every
                task = asyncio.create_task(self._one(session, i))
                self.in_flight.add(task)
                task.add_done_callback(self.in_flight.discard)
                i += 1
                await asyncio.sleep(max(0.0, started + i / a.rate - time.monotonic()))
            await asyncio.gather(*self.in_flight)
            self._sample(time.monotonic() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=1200.0, help="seconds of traffic")
    parser.add_argument("--rate", type=float, default=4.0, help="requests per second")
    parser.add_argument("--restart-every", type=float, default=300.0, help="0: no restarts")
    parser.add_argument("--sample-every", type=float, default=10.0)
    parser.add_argument("--work", type=Path, default=Path(".kiban/soak"))
    parser.add_argument("--json", type=Path, help="write samples and summary here")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    config = _config(args.work.resolve())
    config_path = args.work.resolve() / "soak.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    up = subprocess.run([str(KIBAN), "up", "-d", "-c", str(config_path)], check=False)
    if up.returncode != 0:
        sys.exit("kiban up failed")
    soak = Soak(args, config_path, f"http://127.0.0.1:{config['gateway']['port']}")
    try:
        asyncio.run(soak.run())
    finally:
        subprocess.run([str(KIBAN), "down", "-c", str(config_path)], check=False)
    total = sum(soak.outcomes.values())
    errors = {k: v for k, v in soak.outcomes.items() if k != "ok"}
    first, last = soak.samples[0], soak.samples[-1]
    summary = {
        "machine": f"{platform.node()}: {os.cpu_count()} CPUs, {platform.platform()}",
        "duration_s": args.duration,
        "rate_per_s": args.rate,
        "requests": total,
        "ok": soak.outcomes["ok"],
        "errors": errors,
        "restarts": soak.restarts,
        "rss_first_mib": {k: v for k, v in first.items() if k.startswith("rss_")},
        "rss_last_mib": {k: v for k, v in last.items() if k.startswith("rss_")},
        "rss_max_mib": {
            k: max(s.get(k, 0) for s in soak.samples) for k in last if k.startswith("rss_")
        },
    }
    print(json.dumps(summary, indent=2))
    if args.json:
        args.json.write_text(json.dumps({"summary": summary, "samples": soak.samples}, indent=2))


if __name__ == "__main__":
    main()
