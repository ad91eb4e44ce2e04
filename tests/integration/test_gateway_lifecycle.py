"""Graceful shutdown and reload of a real `kiban serve`, with one worker and with two.

Requests and streams in flight when SIGTERM or a reload arrives must all
finish; a stream still running at the end of ``shutdown_grace_s`` ends with
an error event; an invalid configuration is refused and the old one keeps
serving.
"""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from tests.support.engines import EngineProcess
from tests.support.gateway import KIBAN, add_key, fault_upstream, gateway_process

CHAT = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory):
    up = fault_upstream(tmp_path_factory.mktemp("lifecycle"), slow_interval=0.25).start()
    yield up
    up.stop()


def _config(url: str, keys_file: Path | None = None, extra_route: bool = False) -> dict:
    gateway: dict = {"health_interval_s": 0.5, "shutdown_grace_s": 4}
    if keys_file is not None:
        gateway["api_keys"] = {"file": str(keys_file)}
    routes = [
        {"model": "ok", "engines": ["up"]},
        {"model": "slow", "engines": [{"engine": "up", "model": "slow"}]},
        {"model": "sleep", "engines": [{"engine": "up", "model": "sleep-2"}]},
    ]
    if extra_route:
        routes.append({"model": "new", "engines": [{"engine": "up", "model": "ok"}]})
    return {
        "gateway": gateway,
        "engines": [
            {"name": "up", "kind": "openai", "url": url, "models": ["ok", "slow", "sleep-2"]}
        ],
        "routes": routes,
    }


class InFlight:
    """Requests started in threads: plain ones and streams, with what each client got."""

    def __init__(self, gw: EngineProcess, headers: dict[str, str] | None = None) -> None:
        self.gw, self.headers = gw, headers or {}
        self.results: list[tuple[int, str]] = []
        self.threads: list[threading.Thread] = []

    def _run(self, body: dict) -> None:
        try:
            with httpx.stream(
                "POST",
                self.gw.base_url + "/v1/chat/completions",
                json={"messages": CHAT, **body},
                headers={"Connection": "close", **self.headers},
                timeout=30,
            ) as resp:
                self.results.append((resp.status_code, resp.read().decode()))
        except httpx.HTTPError as exc:
            self.results.append((0, repr(exc)))

    def start(self, body: dict, n: int = 1) -> None:
        for _ in range(n):
            thread = threading.Thread(target=self._run, args=(body,), daemon=True)
            thread.start()
            self.threads.append(thread)

    def join(self) -> list[tuple[int, str]]:
        """Wait for every request (each ends within its 30 s timeout)."""
        for t in self.threads:
            t.join(60)
        assert not any(t.is_alive() for t in self.threads), "a request outlived its timeout"
        return self.results


@pytest.fixture
def in_flight() -> Iterator[Callable[..., InFlight]]:
    """``in_flight(gw, headers)``: requests in threads, joined after the test whatever happened
    (the test's own ``finally`` stops the gateway first, which ends them at once)."""
    made: list[InFlight] = []

    def make(gw: EngineProcess, headers: dict[str, str] | None = None) -> InFlight:
        made.append(InFlight(gw, headers))
        return made[-1]

    yield make
    for flight in made:
        flight.join()


def _wait_in_flight(gw: EngineProcess, count: int) -> None:
    deadline = time.monotonic() + 10
    while True:
        text = httpx.get(gw.base_url + "/metrics", headers={"Connection": "close"}).text
        total = sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("kiban_in_flight_requests{")
        )
        if total >= count:
            return
        assert time.monotonic() < deadline, f"never {count} requests in flight"
        time.sleep(0.05)


def _reload(config_path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(KIBAN), "reload", "-c", str(config_path)], capture_output=True, text=True, timeout=60
    )


@pytest.mark.parametrize("workers", [1, 2])
def test_sigterm_finishes_in_flight_then_exits(
    upstream, tmp_path: Path, workers: int, in_flight
) -> None:
    gw = gateway_process(_config(upstream.base_url), tmp_path, workers=workers).start(timeout=60)
    try:
        flight = in_flight(gw)
        flight.start({"model": "sleep"}, 3)
        flight.start({"model": "slow", "stream": True, "max_tokens": 8})  # 2 s
        flight.start({"model": "slow", "stream": True, "max_tokens": 60})  # 15 s: too long
        _wait_in_flight(gw, 5)
        gw.proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        with pytest.raises(httpx.ConnectError):  # no longer accepting
            httpx.get(gw.base_url + "/health", timeout=2)
        results = flight.join()
        assert gw.proc.wait(30) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal
    finally:
        gw.stop()
    plain = [body for status, body in results if status == 200 and body.startswith("{")]
    streams = sorted((body for status, body in results if "data: " in body), key=len)
    assert len(plain) == 3 and all(json.loads(b)["choices"] for b in plain)
    assert len(streams) == 2
    assert streams[0].rstrip().endswith("data: [DONE]")  # finished within the grace period
    last = streams[1].strip().split("\n\n")[-1]
    assert "data: [DONE]" not in streams[1] and '"code":"gateway_shutdown"' in last


@pytest.mark.parametrize("workers", [1, 2])
def test_reload_keeps_in_flight_and_refuses_invalid(
    upstream, tmp_path: Path, workers: int, in_flight
) -> None:
    keys_file = tmp_path / "keys.yaml"
    first = add_key(keys_file, "first")
    gw = gateway_process(_config(upstream.base_url, keys_file), tmp_path, workers=workers).start(
        timeout=60
    )
    config_path = tmp_path / "kiban.yaml"
    auth = {"Authorization": f"Bearer {first}", "Connection": "close"}
    try:
        flight = in_flight(gw, {"Authorization": f"Bearer {first}"})
        flight.start({"model": "sleep"}, 2)
        flight.start({"model": "slow", "stream": True, "max_tokens": 12})  # 3 s
        _wait_in_flight(gw, 3)
        second = add_key(keys_file, "second")
        config_path.write_text(
            yaml.safe_dump(_config(upstream.base_url, keys_file, extra_route=True))
        )
        done = _reload(config_path)
        assert done.returncode == 0, done.stdout + done.stderr
        assert done.stdout.count("applied (generation 2)") == workers
        results = flight.join()
        assert [s for s, _ in results] == [200, 200, 200]
        assert any(b.rstrip().endswith("data: [DONE]") for _, b in results)
        for _ in range(6):  # every worker serves the new route and knows the new key
            for key in (first, second):
                resp = httpx.post(
                    gw.base_url + "/v1/chat/completions",
                    json={"model": "new", "messages": CHAT},
                    headers={**auth, "Authorization": f"Bearer {key}"},
                )
                assert resp.status_code == 200, resp.text

        broken = _config(upstream.base_url, keys_file, extra_route=True)
        broken["routes"][0]["engines"] = ["nowhere"]
        config_path.write_text(yaml.safe_dump(broken))
        refused = _reload(config_path)
        assert refused.returncode == 2
        assert "routes[0].engines[0].engine: unknown engine 'nowhere'" in refused.stderr
        gw.proc.send_signal(signal.SIGHUP)  # signalled directly, the gateway refuses it too
        deadline = time.monotonic() + 10
        while "reload rejected" not in gw.log_tail(10**6) and time.monotonic() < deadline:
            time.sleep(0.1)
        log = gw.log_tail(10**6)
        assert "reload rejected" in log and "unknown engine 'nowhere'" in log
        for _ in range(6):
            resp = httpx.post(
                gw.base_url + "/v1/chat/completions",
                json={"model": "new", "messages": CHAT},
                headers=auth,
            )
            assert resp.status_code == 200  # the previous configuration goes on serving
        assert gw.running()
    finally:
        gw.stop()
