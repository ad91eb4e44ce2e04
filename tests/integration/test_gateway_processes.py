"""The gateway process itself: several workers, engines that come and go, broken streams.

Real `kiban serve` processes over loopback in front of the fault-injecting
upstream (no inference engine needed, so these run in seconds).
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import httpx
import pytest

from tests.support.engines import EngineProcess
from tests.support.gateway import fault_upstream, gateway_process

CHAT = {"messages": [{"role": "user", "content": "hi"}]}


def _config(url: str, **gateway: object) -> dict:
    return {
        "gateway": {"health_interval_s": 0.3, **gateway},
        "engines": [
            {"name": "up", "kind": "openai", "url": url, "models": ["ok", "no-done", "drop"]},
        ],
        "routes": [
            {"model": "ok", "engines": ["up"]},
            {"model": "no-done", "engines": [{"engine": "up", "model": "no-done"}]},
            {"model": "drop", "engines": [{"engine": "up", "model": "drop"}]},
            {
                "model": "sticky",
                "engines": [{"engine": "up", "model": "ok"}],
                "strategy": "session",
            },
        ],
    }


@pytest.fixture
def fault(tmp_path: Path):
    upstream = fault_upstream(tmp_path)
    yield upstream
    upstream.stop()


def _sum_counter(metrics: str, name: str) -> float:
    return sum(float(v) for v in re.findall(rf"^{name}\{{[^}}]*\}} ([\d.e+]+)$", metrics, re.M))


def test_workers_share_one_metrics_view(fault: EngineProcess, tmp_path: Path) -> None:
    fault.start()
    gw = gateway_process(_config(fault.base_url), tmp_path, workers=2).start(timeout=60)
    try:
        with httpx.Client(base_url=gw.base_url, timeout=10) as client:
            for _ in range(40):
                # a new connection each time, so the kernel spreads them over the workers
                resp = client.post(
                    "/v1/chat/completions",
                    json={"model": "ok", **CHAT},
                    headers={"Connection": "close"},
                )
                assert resp.status_code == 200
                resp = client.post(  # a session route without a key: counted "no_key"
                    "/v1/chat/completions",
                    json={"model": "sticky", **CHAT},
                    headers={"Connection": "close"},
                )
                assert resp.status_code == 200
            for _ in range(20):
                text = client.get("/metrics", headers={"Connection": "close"}).text
                assert _sum_counter(text, "kiban_requests_total") == 80
            # each worker counts its routing decisions in memory and publishes them every
            # second: whichever worker answers, all 40 show within a few seconds, never more
            decisions = "kiban_route_affinity_decisions_total"
            seen: list[float] = []
            deadline = time.monotonic() + 10
            while not seen or (seen[-1] < 40 and time.monotonic() < deadline):
                time.sleep(0.2)
                text = client.get("/metrics", headers={"Connection": "close"}).text
                seen.append(_sum_counter(text, decisions))
            assert seen[-1] == 40 and max(seen) == 40, seen
        log = [json.loads(ln) for ln in gw.log_tail(10**6).splitlines() if ln.startswith("{")]
        assert len({entry["worker"] for entry in log}) == 2  # both workers answered requests
    finally:
        gw.stop()


def test_engine_down_at_start_then_up(fault: EngineProcess, tmp_path: Path) -> None:
    gw = gateway_process(_config(fault.base_url), tmp_path).start(timeout=60)
    try:
        with httpx.Client(base_url=gw.base_url, timeout=10) as client:
            assert client.get("/health").status_code == 200
            ready = client.get("/ready")
            assert ready.status_code == 503
            assert ready.json()["routes_without_healthy_engine"] == [
                "ok",
                "no-done",
                "drop",
                "sticky",
            ]
            resp = client.post("/v1/chat/completions", json={"model": "ok", **CHAT})
            assert resp.status_code == 503 and resp.json()["error"]["code"] == "no_healthy_engine"
            fault.start()
            deadline = time.monotonic() + 10
            while client.get("/ready").status_code != 200 and time.monotonic() < deadline:
                time.sleep(0.1)
            assert client.get("/ready").status_code == 200
            resp = client.post("/v1/chat/completions", json={"model": "ok", **CHAT})
            assert resp.status_code == 200
    finally:
        gw.stop()


@pytest.mark.parametrize(
    ("model", "code"),
    [("no-done", "upstream_stream_incomplete"), ("drop", "upstream_stream_broken")],
)
def test_broken_stream_ends_with_error_event(
    fault: EngineProcess, tmp_path: Path, model: str, code: str
) -> None:
    fault.start()
    gw = gateway_process(_config(fault.base_url), tmp_path).start(timeout=60)
    try:
        body = {"model": model, "stream": True, **CHAT}
        url = gw.base_url + "/v1/chat/completions"
        with httpx.stream("POST", url, json=body, timeout=10) as resp:
            assert resp.status_code == 200
            events = [e for e in resp.read().decode().split("\n\n") if e.strip()]
        assert len(events) == 3 and "data: [DONE]" not in resp.text
        assert events[-1].startswith('data: {"error":') and f'"code":"{code}"' in events[-1]
    finally:
        gw.stop()
