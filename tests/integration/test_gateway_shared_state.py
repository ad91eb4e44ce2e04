"""Two gateway processes sharing rate limits and circuit breakers through a real Redis.

Debian's redis-server is started on a free port (no persistence) and
stopped by PID; two `kiban serve` processes share it through
``gateway.shared_state``; requests alternate between them.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from tests.support.engines import EngineProcess, free_port
from tests.support.gateway import KIBAN, add_key, fault_upstream, gateway_process
from tests.support.reaper import REAPER

CHAT = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory):
    binary = shutil.which("redis-server")
    assert binary, "redis-server is missing: run scripts/bootstrap.sh (scripts/debian-packages.txt)"
    port = free_port()
    work = tmp_path_factory.mktemp("redis")
    log = (work / "redis.log").open("wb")
    argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(work)]
    proc = subprocess.Popen(
        [*argv, "--save", "", "--appendonly", "no"],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    REAPER.watch_group(proc.pid)
    try:
        deadline = time.monotonic() + 20
        while b"Ready to accept connections" not in (work / "redis.log").read_bytes():
            assert proc.poll() is None and time.monotonic() < deadline, "redis did not start"
            time.sleep(0.1)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(20)
        REAPER.forget_group(proc.pid)
        log.close()


@pytest.fixture(scope="module")
def upstreams(tmp_path_factory: pytest.TempPathFactory):
    log_dir = tmp_path_factory.mktemp("shared")
    a, b = fault_upstream(log_dir).start(), fault_upstream(log_dir).start()
    yield a, b
    a.stop()
    b.stop()


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    keys_file = tmp_path_factory.mktemp("keys") / "keys.yaml"

    rpm, tpm = add_key(keys_file, "rpm", "--rpm", "6"), add_key(keys_file, "tpm", "--tpm", "30")
    return keys_file, {"rpm": rpm, "tpm": tpm, "count": add_key(keys_file, "count")}


@pytest.fixture(scope="module")
def gateways(redis_url, upstreams, keys, tmp_path_factory: pytest.TempPathFactory):
    a, b = upstreams
    config = {
        "gateway": {
            "api_keys": {"file": str(keys[0])},
            "shared_state": {"url": redis_url, "prefix": f"kiban-test-{free_port()}"},
            "health_interval_s": 600,
            "usage_flush_s": 0.5,
        },
        "engines": [
            {
                "name": "a",
                "kind": "openai",
                "url": a.base_url,
                "models": ["ok"],
                "circuit": {"failures": 2, "cooldown_s": 30},
            },
            {"name": "b", "kind": "openai", "url": b.base_url, "models": ["ok"]},
        ],
        "routes": [{"model": "ok", "engines": ["a", "b"]}],
    }
    work = tmp_path_factory.mktemp("gateways")
    started = [gateway_process(config, work / f"r{i}", name=f"r{i}") for i in range(2)]
    for gw in started:
        gw.start(timeout=60)
    yield started
    for gw in started:
        gw.stop()


def _chat(gw: EngineProcess, key: str) -> httpx.Response:
    return httpx.post(
        gw.base_url + "/v1/chat/completions",
        json={"model": "ok", "messages": CHAT},
        headers={"Authorization": f"Bearer {key}"},
        timeout=30,
    )


def test_usage_per_key_adds_up_across_replicas(gateways, keys) -> None:
    """Both replicas write into the same Redis rows; `kiban keys usage` reads them back."""
    for i in range(4):
        assert _chat(gateways[i % 2], keys[1]["count"]).status_code == 200
    config = next(gateways[0].log_path.parent.glob("r0.yaml"))
    argv = [str(KIBAN), "keys", "usage", "count", "-c", str(config), "--since", "1h", "--json"]
    deadline = time.monotonic() + 20
    while True:
        rows = json.loads(subprocess.run(argv, capture_output=True, text=True, check=True).stdout)
        if sum(r["requests"] for r in rows) >= 4 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert sum(r["requests"] for r in rows) == 4
    assert sum(r["prompt_tokens"] for r in rows) == 4 * 3  # the upstream's usage: 3 and 2
    assert sum(r["completion_tokens"] for r in rows) == 4 * 2
    assert {r["key"] for r in rows} == {"count"}


def test_request_limit_enforced_across_replicas(gateways, keys) -> None:
    key = keys[1]["rpm"]
    statuses = [_chat(gateways[i % 2], key).status_code for i in range(8)]
    assert statuses == [200] * 6 + [429, 429]  # 6 a minute in all, not 6 on each
    refused = _chat(gateways[0], key)
    assert "requests_per_minute limit (6)" in refused.json()["error"]["message"]


def test_token_limit_enforced_across_replicas(gateways, keys) -> None:
    """30 tokens a minute; each answer reports 5: about 6 requests in all fit."""
    key = keys[1]["tpm"]
    statuses = []
    for i in range(12):
        statuses.append(_chat(gateways[i % 2], key).status_code)
        if statuses[-1] == 429:
            break
    assert statuses[:4] == [200] * 4 and statuses[-1] == 429 and len(statuses) <= 9


def test_circuit_opened_by_one_replica_is_open_in_the_other(gateways, upstreams, keys) -> None:
    a, _b = upstreams
    free = add_key(keys[0], "free")
    for gw in gateways:  # the new key: each replica reloads its keys file
        gw.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while _chat(gateways[1], free).status_code == 401 and time.monotonic() < deadline:
        time.sleep(0.1)
    httpx.post(a.base_url + "/fault", json={"mode": "status-500"})
    try:
        for _ in range(2):  # two failures on replica 0 open a's circuit (failures: 2)
            assert _chat(gateways[0], free).headers["x-kiban-engine"] == "b"
        received = httpx.get(a.base_url + "/stats").json()["total"]
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            text = httpx.get(gateways[1].base_url + "/metrics").text
            if re.search(r'kiban_engine_circuit_state\{engine="a"\} 2\.0', text):
                break
            time.sleep(0.05)
        assert re.search(r'kiban_engine_circuit_state\{engine="a"\} 2\.0', text)
        for _ in range(4):  # replica 1 never saw a fail, yet sends nothing to it
            assert _chat(gateways[1], free).headers["x-kiban-engine"] == "b"
        assert httpx.get(a.base_url + "/stats").json()["total"] == received
    finally:
        httpx.post(a.base_url + "/fault", json={"mode": None})
