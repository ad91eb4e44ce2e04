"""Overload: per-engine concurrency with a bounded queue, per-key rate limits and allow-lists.

A real `kiban serve` in front of the fault-injecting upstream (``sleep-S``
models hold a request for S seconds). Keys are made with `kiban keys add`,
so the file holds digests only.
"""

from __future__ import annotations

import re
import time
from functools import partial
from pathlib import Path

import httpx
import pytest

from tests.support.engines import EngineProcess
from tests.support.gateway import add_key, fault_upstream, gateway_process
from tests.support.load import background_load

CHAT = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory):
    up = fault_upstream(tmp_path_factory.mktemp("overload")).start()
    yield up
    up.stop()


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    keys_file = tmp_path_factory.mktemp("keys") / "keys.yaml"
    made = {
        "rpm": add_key(keys_file, "rpm", "--rpm", "3"),
        "tpm": add_key(keys_file, "tpm", "--tpm", "40"),
        "only-ok": add_key(keys_file, "only-ok", "--models", "ok"),
        "free": add_key(keys_file, "free"),
    }
    return keys_file, made


@pytest.fixture(scope="module")
def gateway(upstream, keys, tmp_path_factory: pytest.TempPathFactory):
    keys_file, _ = keys
    url = upstream.base_url
    sleepy = ["sleep-1", "sleep-3"]
    config = {
        "gateway": {"api_keys": {"file": str(keys_file)}, "health_interval_s": 0.5},
        "engines": [
            {"name": "up", "kind": "openai", "url": url, "models": ["ok"]},
            {
                "name": "queued",
                "kind": "openai",
                "url": url,
                "models": sleepy,
                "max_concurrency": 2,
                "max_queue": 2,
                "queue_timeout_s": 30,
            },
            {
                "name": "impatient",
                "kind": "openai",
                "url": url,
                "models": sleepy,
                "max_concurrency": 1,
                "max_queue": 1,
                "queue_timeout_s": 0.5,
            },
        ],
        "routes": [
            {"model": "ok", "engines": ["up"]},
            {"model": "other", "engines": [{"engine": "up", "model": "ok"}]},
            {"model": "queued", "engines": [{"engine": "queued", "model": "sleep-1"}]},
            {"model": "impatient", "engines": [{"engine": "impatient", "model": "sleep-3"}]},
        ],
    }
    gw = gateway_process(config, tmp_path_factory.mktemp("gw"), name="overload").start(timeout=60)
    yield gw
    gw.stop()


def _chat(gw: EngineProcess, key: str, model: str = "ok", **body) -> httpx.Response:
    return httpx.post(
        gw.base_url + "/v1/chat/completions",
        json={"model": model, "messages": CHAT, **body},
        headers={"Authorization": f"Bearer {key}"},
        timeout=60,
    )


def _stats(upstream: EngineProcess) -> dict:
    return httpx.get(upstream.base_url + "/stats").json()


def _gauge(gw: EngineProcess, route: str) -> float:
    text = httpx.get(gw.base_url + "/metrics").text
    match = re.search(rf'kiban_in_flight_requests\{{route="{route}"\}} ([\d.]+)', text)
    return float(match.group(1)) if match else 0.0


def _in_flight(gw: EngineProcess, route: str, count: int) -> None:
    deadline = time.monotonic() + 10
    while _gauge(gw, route) < count:
        assert time.monotonic() < deadline, f"{route}: {count} requests never in flight"
        time.sleep(0.05)


# -- per-engine concurrency and the bounded queue -------------------------------------------


def test_queue_waits_then_serves_and_overflow_gets_429(gateway, upstream, keys) -> None:
    key = keys[1]["free"]
    queued = partial(_chat, gateway, key, "queued")
    with background_load(queued, workers=4, max_requests=4, max_seconds=60) as load:
        _in_flight(gateway, "queued", 4)  # 2 at the engine, 2 waiting in its queue
        overflow = _chat(gateway, key, "queued")
        load.run_out()
    assert overflow.status_code == 429 and overflow.headers["retry-after"] == "1"
    error = overflow.json()["error"]
    assert error["code"] == "engines_saturated" and error["type"] == "rate_limit_error"
    assert "max_concurrency 2" in error["message"] and "max_queue 2" in error["message"]
    assert load.failure_count == 0, load.describe_failures()
    assert [r.status_code for r in load.results] == [200] * 4  # the queued ones were served
    assert _stats(upstream)["max_in_flight"] <= 2 + 1  # 2 of ours (plus a health check)


def test_queue_timeout_429_names_the_key(gateway, keys) -> None:
    key = keys[1]["free"]
    impatient = partial(_chat, gateway, key, "impatient")
    with background_load(impatient, workers=1, max_requests=1, max_seconds=60) as load:
        _in_flight(gateway, "impatient", 1)
        waited = _chat(gateway, key, "impatient")
        load.run_out()
    assert waited.status_code == 429
    error = waited.json()["error"]
    assert error["code"] == "queue_timeout" and "queue_timeout_s" in error["message"]
    assert "0.5 s" in error["message"]
    assert load.failure_count == 0, load.describe_failures()
    assert load.results[0].status_code == 200
    text = httpx.get(gateway.base_url + "/metrics").text
    assert re.search(
        r'kiban_rate_limit_rejections_total\{limit="engine_queue_timeout",route="impatient"\} 1',
        text,
    )


# -- per-key limits, enforced before the engine is touched ------------------------------------


def test_requests_per_minute(gateway, upstream, keys) -> None:
    key = keys[1]["rpm"]
    before = _stats(upstream)["requests"].get("ok", 0)
    statuses = [_chat(gateway, key).status_code for _ in range(3)]
    refused = _chat(gateway, key)
    assert statuses == [200, 200, 200] and refused.status_code == 429
    error = refused.json()["error"]
    assert (
        error["code"] == "rate_limit_exceeded"
        and "requests_per_minute limit (3)" in error["message"]
    )
    assert int(refused.headers["retry-after"]) >= 1
    assert _stats(upstream)["requests"].get("ok", 0) == before + 3  # the 4th never reached it
    assert _chat(gateway, keys[1]["free"]).status_code == 200  # other keys are not held
    text = httpx.get(gateway.base_url + "/metrics").text
    assert 'kiban_rate_limit_rejections_total{limit="requests_per_minute",route="ok"} 1.0' in text


def test_tokens_per_minute_counts_reported_usage(gateway, keys) -> None:
    """The upstream reports 5 tokens a request: about 8 requests fit in 40 tokens a minute."""
    key = keys[1]["tpm"]
    statuses = []
    for _ in range(14):
        statuses.append(_chat(gateway, key).status_code)
        if statuses[-1] == 429:
            break
    assert statuses[:6] == [200] * 6 and statuses[-1] == 429
    refused = _chat(gateway, key)
    assert "tokens_per_minute limit (40)" in refused.json()["error"]["message"]
    # a request that may use more than the whole minute's budget waits for a full bucket
    assert _chat(gateway, key, max_tokens=10_000).status_code == 429


def test_model_allow_list(gateway, keys) -> None:
    key = keys[1]["only-ok"]
    assert _chat(gateway, key, "ok").status_code == 200
    refused = _chat(gateway, key, "other")
    assert refused.status_code == 403
    error = refused.json()["error"]
    assert error["code"] == "model_not_allowed" and error["type"] == "permission_error"
    assert "may use: ok" in error["message"]
    models = httpx.get(
        gateway.base_url + "/v1/models", headers={"Authorization": f"Bearer {key}"}
    ).json()
    assert [m["id"] for m in models["data"]] == ["ok"]
