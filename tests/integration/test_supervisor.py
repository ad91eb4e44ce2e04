"""`kiban up` / `status` / `logs` / `down` as a user runs them, on real processes.

The managed engines here are OpenAI-compatible servers that kiban launches
from a command line (kind ``openai`` with ``launch.command``): the
fault-injecting upstream, which starts in a second. Real vLLM and llama.cpp
under `kiban up` are in test_up_real_engines.py.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from kiban.processes import ProcessId, group_members
from tests.support.cli import kiban, kiban_up_popen
from tests.support.engines import free_port
from tests.support.gateway import REPO_ROOT

pytestmark = pytest.mark.slow  # left out of `make check`

SERVER = [sys.executable, "-m", "tests.support.fault_upstream", "--port", "{port}"]
CHAT = {"model": "ok", "messages": [{"role": "user", "content": "hi"}]}


def _engine(name: str, command: list[str] = SERVER, **launch: object) -> dict:
    return {
        "name": name,
        "kind": "openai",
        "models": ["ok"],
        "launch": {
            "model": "fault-upstream",
            "command": command,
            "device": "cpu",
            "port": free_port(),
            "env": {"PYTHONPATH": str(REPO_ROOT)},
            "stop_grace_s": 5,
            "ready_timeout_s": 30,
            **launch,
        },
    }


def _write(tmp_path: Path, engines: list[dict], **gateway: object) -> Path:
    config = {
        "gateway": {"port": free_port(), "health_interval_s": 0.3, **gateway},
        "engines": engines,
        "routes": [
            {"model": "ok", "engines": [e["name"] for e in engines], "strategy": "round_robin"}
        ],
    }
    path = tmp_path / "kiban.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _status(config: Path) -> dict[str, dict]:
    result = kiban("status", "-c", str(config), "--json")
    assert result.returncode == 0, result.stderr
    return {p["name"]: p for p in json.loads(result.stdout)["processes"]}


def _wait_for(predicate, timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


@pytest.fixture
def run_dirs():
    """Every config brought up in a test is brought down afterwards, whatever happened."""
    configs: list[Path] = []
    yield configs
    for config in configs:
        kiban("down", "-c", str(config), timeout=120)


def test_up_status_crash_restart_logs_down(tmp_path: Path, run_dirs: list[Path]) -> None:
    config = _write(tmp_path, [_engine("e1"), _engine("e2")])
    run_dirs.append(config)
    result = kiban("up", "-c", str(config), "--detach")
    assert result.returncode == 0, result.stderr
    assert "supervisor daemon PID" in result.stderr
    status = _status(config)
    assert {n: (s["state"], s["healthy"]) for n, s in status.items()} == {
        "e1": ("running", True),
        "e2": ("running", True),
        "gateway": ("running", True),
    }
    gateway = status["gateway"]["url"]
    first_pid = status["e1"]["pid"]
    with httpx.Client(base_url=gateway, timeout=10) as client:
        assert client.post("/v1/chat/completions", json=CHAT).status_code == 200
        os.kill(first_pid, signal.SIGKILL)  # a crash
        for _ in range(20):  # the gateway fails over at once
            assert client.post("/v1/chat/completions", json=CHAT).status_code == 200
        _wait_for(
            lambda: (
                _status(config)["e1"]["state"] == "running"
                and _status(config)["e1"]["pid"] != first_pid
            ),
            what="e1 restarted",
        )
        after = _status(config)["e1"]
        assert after["restarts"] == 1 and after["healthy"]
        assert "restart 1 after: exited" in after["message"]
        served = set()
        _wait_for(
            lambda: (
                served.add(client.post("/v1/chat/completions", json=CHAT).headers["x-kiban-engine"])
                or "e1" in served
            ),
            what="e1 takes traffic again",
        )

    logs = kiban("logs", "e1", "-c", str(config), "-n", "200")
    assert logs.returncode == 0 and logs.stdout.count("tests.support.fault_upstream") == 2
    assert kiban("logs", "nope", "-c", str(config)).returncode == 1

    pids = [s["pid"] for s in _status(config).values()]
    down = kiban("down", "-c", str(config))
    assert down.returncode == 0, down.stderr
    assert all(not group_members(pid) for pid in pids)
    assert {s["state"] for s in _status(config).values()} == {"stopped"}


def test_restart_limit_gives_up(tmp_path: Path, run_dirs: list[Path]) -> None:
    # healthy for two seconds, then gone: every restart dies again
    dying = ["timeout", "2", *SERVER]
    restart = {"max_restarts": 2, "backoff_s": 0.2, "reset_after_s": 600}
    config = _write(tmp_path, [_engine("flaky", dying, restart=restart), _engine("steady")])
    run_dirs.append(config)
    assert kiban("up", "-c", str(config), "-d").returncode == 0
    _wait_for(
        lambda: _status(config)["flaky"]["state"] == "failed", timeout=60, what="flaky given up"
    )
    flaky = _status(config)["flaky"]
    assert flaky["restarts"] == 2 and "gave up after 2 restarts" in flaky["message"]
    assert _status(config)["steady"]["state"] == "running"


def test_failed_start_shows_reason_and_log(tmp_path: Path) -> None:
    broken = [sys.executable, "-c", "print('model file is corrupt'); raise SystemExit(3)"]
    config = _write(tmp_path, [_engine("ok-engine"), _engine("broken", broken)])
    result = kiban("up", "-c", str(config))
    assert result.returncode == 1
    assert "broken: exited with code 3 before it was healthy" in result.stderr
    assert "model file is corrupt" in result.stderr  # the end of the engine's log
    state = _status(config)
    assert state["ok-engine"]["state"] == "stopped" and state["ok-engine"]["pid"] is None


def test_gpu_engine_refused_without_gpu(tmp_path: Path) -> None:
    engine = {
        "name": "big",
        "kind": "vllm",
        "models": ["qwen"],
        "launch": {"model": "Qwen/Qwen2.5-7B-Instruct", "gpus": [0], "port": free_port()},
    }
    config = _write(tmp_path, [engine])
    result = kiban("up", "-c", str(config))
    assert result.returncode == 1
    assert "engines 'big' (GPUs 0) need an NVIDIA GPU, but NVML library" in result.stderr
    assert "launch.device: cpu" in result.stderr
    assert not (tmp_path / ".kiban" / "kiban" / "state.json").exists()  # nothing started


def test_foreground_up_stops_everything_on_ctrl_c(tmp_path: Path) -> None:
    config = _write(tmp_path, [_engine("e1")])
    proc = kiban_up_popen(config)
    try:
        _wait_for(
            lambda: (
                (tmp_path / ".kiban/kiban/state.json").exists()
                and _status(config)["gateway"]["state"] == "running"
            ),
            what="up",
        )
        pids = [s["pid"] for s in _status(config).values()]
        proc.send_signal(signal.SIGINT)
        output, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, output
    assert all(not group_members(pid) for pid in pids)


def test_down_after_supervisor_was_killed(tmp_path: Path) -> None:
    config = _write(tmp_path, [_engine("e1")])
    assert kiban("up", "-c", str(config), "-d").returncode == 0
    state = json.loads((tmp_path / ".kiban/kiban/state.json").read_text())
    supervisor = ProcessId(state["supervisor_pid"], state["supervisor_start_ticks"])
    os.kill(supervisor.pid, signal.SIGKILL)
    _wait_for(lambda: not supervisor.alive(), what="supervisor gone")
    pids = [s["pid"] for s in _status(config).values()]
    assert all(pids)
    assert kiban("down", "-c", str(config)).returncode == 0
    assert all(not group_members(pid) for pid in pids)


def test_launch_config_errors(tmp_path: Path) -> None:
    vllm = {
        "name": "v",
        "kind": "vllm",
        "models": ["m"],
        "launch": {"model": "/m", "command": ["x"], "port": 9},
    }
    generic = {
        "name": "g",
        "kind": "openai",
        "url": "http://127.0.0.1:8000",
        "models": ["m"],
        "launch": {"model": "x"},
    }
    config = _write(tmp_path, [vllm, generic])
    result = kiban("config", "check", "-c", str(config))
    assert result.returncode == 2
    assert "engines[0].launch.command: kind 'vllm' is launched by kiban" in result.stderr
    assert "engines[1].launch.command: required for kind 'openai'" in result.stderr


def test_up_refuses_a_launched_engine_on_another_host(tmp_path: Path) -> None:
    remote = _engine("far")
    remote["url"] = "http://10.1.2.3:8000"
    config = _write(tmp_path, [remote])
    result = kiban("up", "-c", str(config))
    assert result.returncode == 1
    assert "engine 'far': kiban up runs engines on this machine" in result.stderr
