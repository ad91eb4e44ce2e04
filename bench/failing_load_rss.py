"""A failing load test must not grow the test process: pytest's RSS, sampled, both ways.

Writes two deliberately broken copies of a kill-under-load test into a
temporary folder and runs each in its own pytest process, sampling that
process's RSS every second:

- ``leaky``: the pattern that took CI down (issue 13): load threads started by
  hand, ``stop.set()`` after the failing assertion, failures appended to a list;
- ``bounded``: the same test through ``tests.support.load.background_load``.

Each test's load calls a closed port on loopback (every call fails at once, as
calls to a dead gateway do), its assertion fails after two seconds, and a
second test then idles for ``--idle`` seconds while the sampler watches. Run
from the repository root::

    .venv/bin/python bench/failing_load_rss.py --idle 30
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

COMMON = """
import socket, threading, time
import httpx

def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

URL = f"http://127.0.0.1:{closed_port()}/v1/chat/completions"

def call():
    return httpx.post(URL, json={"model": "tiny"}, timeout=1)
"""

IDLE = """
def test_idle_afterwards():
    open("idle-started", "w").close()
    time.sleep(IDLE_S)
"""

LEAKY = """
def test_broken_kill_under_load():
    stop, errors = threading.Event(), []
    def load():
        while not stop.is_set():
            try:
                call()
            except Exception as exc:
                errors.append(exc)
    for _ in range(3):
        threading.Thread(target=load, daemon=True).start()
    time.sleep(2)
    assert False, "the engine did not come back"
    stop.set()
"""

BOUNDED = """
from tests.support.load import background_load

def test_broken_kill_under_load():
    with background_load(call, workers=3, max_requests=100_000, max_seconds=300):
        time.sleep(2)
        assert False, "the engine did not come back"
"""


def _rss_mb_and_threads(pid: int) -> tuple[float, int] | None:
    try:
        fields = dict(
            line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
        )
        return int(fields["VmRSS"].split()[0]) / 1024, int(fields["Threads"])
    except (OSError, KeyError, ValueError):
        return None


def _run(name: str, body: str, idle_s: int, folder: Path) -> list[tuple[float, int]]:
    """Run one broken test file; (RSS MB, threads) of pytest each second while the
    idle test runs, that is after the broken test failed."""
    test = folder / f"test_{name}.py"
    test.write_text(f"IDLE_S = {idle_s}\n" + textwrap.dedent(COMMON + body + IDLE))
    env = os.environ | {"PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(test)]
    proc = subprocess.Popen(cmd, cwd=folder, env=env, stdout=subprocess.PIPE, text=True)
    samples: list[tuple[float, int]] = []
    try:
        while proc.poll() is None:
            sample = _rss_mb_and_threads(proc.pid)
            if sample is not None and (folder / "idle-started").exists():
                samples.append(sample)
            time.sleep(1)
    finally:
        if proc.poll() is None:
            proc.kill()
        out = proc.communicate()[0]
        (folder / "idle-started").unlink(missing_ok=True)
    print(f"{name}: {out.strip().splitlines()[-1]}")
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--idle", type=int, default=30, help="seconds the second test idles")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="kiban-rss-") as tmp:
        for name, body in (("leaky", LEAKY), ("bounded", BOUNDED)):
            samples = _run(name, body, args.idle, Path(tmp))
            first, last = samples[0][0], samples[-1][0]
            print(
                f"{name}: after the failure, pytest RSS {first:.0f} MB -> {last:.0f} MB "
                f"({(last - first) / len(samples):+.1f} MB/s over {len(samples)} s), "
                f"threads {max(t for _, t in samples)}"
            )


if __name__ == "__main__":
    main()
