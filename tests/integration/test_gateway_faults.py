"""Engines that fail in every way the issue lists, behind a real `kiban serve` process.

Two fault-injecting upstreams (tests/support/fault_upstream.py) play the
engines: ``a`` can be switched to fail every request and back (ejection and
re-admission), ``b`` stays well. A listening socket whose accept queue is
full plays an engine that never completes a TCP handshake (connect timeout);
a free port, one that refuses connections; a ``.invalid`` host name, one whose
name does not resolve. Each test says what the client gets, whether kiban
retried (only before the first byte), and that other routes go on.
The same faults with real engines killed by PID are in test_faults_real_engines.py.
"""

from __future__ import annotations

import contextlib
import json
import re
import socket
import time
from functools import partial

import httpx
import pytest

from tests.support.engines import EngineProcess
from tests.support.gateway import fault_upstream, gateway_process
from tests.support.load import background_load

CHAT = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def upstreams(tmp_path_factory: pytest.TempPathFactory):
    log_dir = tmp_path_factory.mktemp("faults")
    started = {n: fault_upstream(log_dir, slow_interval=0.25).start() for n in ("a", "b", "c")}
    yield started
    for upstream in started.values():
        upstream.stop()


def _black_hole(port: int) -> list[socket.socket]:
    """Listen on *port* and never accept: once its queue is full, handshakes never complete."""
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", port))
    server.listen(0)
    fillers = [server]
    for _ in range(3):
        filler = socket.socket()
        filler.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            filler.connect(("127.0.0.1", port))
        fillers.append(filler)
    time.sleep(0.2)
    return fillers


# a's circuit stays open this long after failures; a probe may pass through after each
A_COOLDOWN_S = 4.0

_A_ROUTES = ("hang", "slow", "stall", "truncated", "nonjson", "status-500", "status-429")


@pytest.fixture(scope="module")
def gateway(upstreams, tmp_path_factory: pytest.TempPathFactory):
    url = {name: u.base_url for name, u in upstreams.items()}

    def engine(side: str, model: str, **extra) -> dict:
        name = side if model == "ok" else f"{side}-{model}"
        return {"name": name, "kind": "openai", "url": url[side], "models": [model], **extra}

    config = {
        # health is checked at start-up, then not again during the module: the tests that
        # take engines away show what a request meets before any health check notices
        "gateway": {"health_interval_s": 600, "health_timeout_s": 1},
        "engines": [
            engine("a", "ok", circuit={"failures": 2, "cooldown_s": A_COOLDOWN_S}),
            engine("b", "ok"),
            engine("c", "ok"),
            *[engine("a", m) for m in (*_A_ROUTES, "no-done", "drop")],
            *[engine("b", m) for m in ("status-500", "no-done", "drop")],
            {
                "name": "unresolvable",
                "kind": "openai",
                "url": "http://kiban-no-such-host.invalid:8000",
                "models": ["ok"],
            },
        ],
        "routes": [
            {"model": "ok", "engines": ["a", "b"]},
            {"model": "only-b", "engines": ["b"]},
            {
                "model": "c-then-b",
                "engines": ["c", "b"],
                "timeouts": {"connect_s": 0.5},
                # each failure on c moves on to b at once: the attempts below count engines
                "failover": {"same_engine_retries": 0},
            },
            *[{"model": m, "engines": [f"a-{m}"]} for m in _A_ROUTES],
            {"model": "slow-total", "engines": ["a-slow"], "timeouts": {"total_s": 1.1}},
            {"model": "truncated-then-ok", "engines": ["a-truncated", "b"]},
            {"model": "500-then-ok", "engines": ["a-status-500", "b"]},
            {"model": "500-everywhere", "engines": ["a-status-500", "b-status-500"]},
            {"model": "no-done", "engines": ["a-no-done", "b-no-done"]},
            {"model": "drop", "engines": ["a-drop", "b-drop"]},
            {"model": "unresolvable", "engines": ["unresolvable", "b"]},
            {"model": "all-down", "engines": ["unresolvable"]},
        ],
    }
    for route in config["routes"]:
        if route["model"] == "hang":
            route["timeouts"] = {"total_s": 1}  # a non-streamed answer: total_s bounds it
        elif route["model"] == "status-429":
            route["timeouts"] = {"total_s": 5}  # shorter than Retry-After: no wait, no retry
        elif route["model"] == "slow":
            route["timeouts"] = {"idle_s": 2}
        elif route["model"] == "stall":
            route["timeouts"] = {"idle_s": 1}
    gw = gateway_process(config, tmp_path_factory.mktemp("gw"), name="faults").start(timeout=60)
    yield gw
    gw.stop()


@pytest.fixture(autouse=True)
def healthy_a(upstreams):
    """Every test starts (and ends) with engine a answering normally."""
    httpx.post(upstreams["a"].base_url + "/fault", json={"mode": None})
    yield
    httpx.post(upstreams["a"].base_url + "/fault", json={"mode": None})


def _chat(gw: EngineProcess, model: str, timeout: float = 30, **body) -> httpx.Response:
    return httpx.post(
        gw.base_url + "/v1/chat/completions",
        json={"model": model, "messages": CHAT, **body},
        timeout=timeout,
    )


def _stream(gw: EngineProcess, model: str, **body) -> tuple[int, list[str]]:
    with httpx.stream(
        "POST",
        gw.base_url + "/v1/chat/completions",
        json={"model": model, "messages": CHAT, "stream": True, **body},
        timeout=30,
    ) as resp:
        text = resp.read().decode()
    return resp.status_code, [e for e in text.split("\n\n") if e.strip()]


def _error(resp: httpx.Response, status: int) -> dict:
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert isinstance(error["message"], str) and error["message"] and "type" in error
    return error


def _error_event(event: str) -> dict:
    assert event.startswith("data: "), event
    return json.loads(event[6:])["error"]


def _received(upstream: EngineProcess, model: str) -> int:
    return httpx.get(upstream.base_url + "/stats").json()["requests"].get(model, 0)


def _log(gw: EngineProcess, last: httpx.Response) -> list[dict]:
    """The request log up to and including the line of the response ``last``."""
    text = gw.wait_for_log(f'"request_id":"{last.headers["x-request-id"]}"')
    return [json.loads(ln) for ln in text.splitlines() if ln.startswith("{")]


def _other_route_answers(gw: EngineProcess) -> None:
    resp = _chat(gw, "only-b", timeout=5)
    assert resp.status_code == 200 and resp.headers["x-kiban-engine"] == "b"


# -- an engine that accepts the request and never answers ----------------------------------


def test_hang_total_timeout_while_other_routes_answer(gateway) -> None:
    started = time.monotonic()
    hang = partial(_chat, gateway, "hang")
    with background_load(hang, workers=4, max_requests=4, max_seconds=60) as load:
        for _ in range(5):  # meanwhile, another route is served at once
            _other_route_answers(gateway)
        load.run_out()
    assert time.monotonic() - started >= 1.0  # the configured total_s, not earlier
    assert load.failure_count == 0 and len(load.results) == 4, load.describe_failures()
    for resp in load.results:
        error = _error(resp, 504)
        assert error["code"] == "upstream_timeout"
        assert "total timeout (1 s" in error["message"]


def test_engine_gone_refused_then_black_hole(gateway, upstreams) -> None:
    """Engine c stops between health checks: refused, then a port that never answers."""
    c = upstreams["c"]
    assert _chat(gateway, "c-then-b").headers["x-kiban-engine"] == "c"
    c.stop()
    resp = _chat(gateway, "c-then-b")  # connection refused: retried on b before any byte
    assert resp.status_code == 200 and resp.headers["x-kiban-engine"] == "b"
    holes = _black_hole(c.port)
    try:
        for _ in range(2):  # the circuit opens at the third failure (failures: 3)
            resp = _chat(gateway, "c-then-b")
            assert resp.status_code == 200 and resp.headers["x-kiban-engine"] == "b"
        entries = [e for e in _log(gateway, resp) if e["route"] == "c-then-b"]
        assert [e["attempts"] for e in entries[-3:]] == [2, 2, 2]
        text = httpx.get(gateway.base_url + "/metrics").text
        for reason, count in (("connect", 1), ("timeout", 2)):
            match = re.search(
                rf'kiban_upstream_failures_total\{{engine="c",reason="{reason}",'
                rf'route="c-then-b"\}} ([\d.]+)',
                text,
            )
            assert match and float(match.group(1)) >= count, reason
        resp = _chat(gateway, "c-then-b")  # c is ejected now: not tried at all
        assert resp.headers["x-kiban-engine"] == "b"
        assert [e["attempts"] for e in _log(gateway, resp) if e["route"] == "c-then-b"][-1] == 1
    finally:
        for s in holes:
            s.close()
    _other_route_answers(gateway)


def test_unresolvable_engine_and_all_down(gateway) -> None:
    resp = _chat(gateway, "unresolvable")
    assert resp.status_code == 200 and resp.headers["x-kiban-engine"] == "b"
    text = httpx.get(gateway.base_url + "/metrics").text
    assert 'kiban_engine_up{engine="unresolvable"} 0.0' in text
    error = _error(_chat(gateway, "all-down"), 503)
    assert error["code"] == "no_healthy_engine" and resp.headers.get("retry-after") is None
    assert _chat(gateway, "all-down").headers["retry-after"] == "5"
    ready = httpx.get(gateway.base_url + "/ready").json()
    assert "all-down" in ready["routes_without_healthy_engine"]
    assert "ok" not in ready["routes_without_healthy_engine"]
    _other_route_answers(gateway)


# -- slow engines and timeouts mid-stream ------------------------------------------------------


def test_slow_engine_streams_to_the_end(gateway) -> None:
    status, events = _stream(gateway, "slow", max_tokens=6)
    assert status == 200 and events[-1] == "data: [DONE]"
    contents = [json.loads(e[6:])["choices"][0]["delta"]["content"] for e in events[:-1]]
    assert contents == [f"t{i} " for i in range(6)]


def test_total_timeout_ends_stream_with_error_event(gateway, upstreams) -> None:
    before = _received(upstreams["a"], "slow")
    status, events = _stream(gateway, "slow-total", max_tokens=20)
    assert status == 200 and 2 <= len(events) < 20 and "data: [DONE]" not in events
    error = _error_event(events[-1])
    assert error["code"] == "upstream_timeout" and "total timeout (1.1 s)" in error["message"]
    assert _received(upstreams["a"], "slow") == before + 1  # not retried after the first byte


def test_silent_stream_idle_timeout(gateway, upstreams) -> None:
    before = _received(upstreams["a"], "stall")
    started = time.monotonic()
    status, events = _stream(gateway, "stall")
    assert time.monotonic() - started >= 1.0
    assert status == 200 and len(events) == 3
    error = _error_event(events[-1])
    assert error["code"] == "upstream_idle_timeout"
    assert "sent nothing for 1 s" in error["message"] and "timeouts.idle_s" in error["message"]
    assert _received(upstreams["a"], "stall") == before + 1
    _other_route_answers(gateway)


# -- broken answers ------------------------------------------------------------------------------


def test_truncated_json_is_never_relayed_as_success(gateway) -> None:
    error = _error(_chat(gateway, "truncated"), 503)
    assert "invalid JSON" in error["message"]
    resp = _chat(gateway, "truncated-then-ok")  # nothing was sent yet: the next engine answers
    assert resp.status_code == 200 and resp.headers["x-kiban-engine"] == "b"
    assert resp.json()["choices"][0]["message"]["content"]


def test_non_json_error_becomes_openai_shaped(gateway) -> None:
    error = _error(_chat(gateway, "nonjson"), 502)
    assert "bad gateway" in error["message"]


@pytest.mark.parametrize(
    ("model", "code"),
    [("no-done", "upstream_stream_incomplete"), ("drop", "upstream_stream_broken")],
)
def test_broken_streams_not_retried_after_first_byte(gateway, upstreams, model, code) -> None:
    before = {u: _received(upstreams[u], model) for u in ("a", "b")}
    status, events = _stream(gateway, model)
    assert status == 200 and "data: [DONE]" not in events and len(events) == 3
    assert _error_event(events[-1])["code"] == code
    after = {u: _received(upstreams[u], model) for u in ("a", "b")}
    assert after == {"a": before["a"] + 1, "b": before["b"]}  # a alone, once: no retry


# -- 500s and 429s: retried before the first byte, breaker opens, engine re-admitted ------------


def test_500_retried_on_next_engine(gateway, upstreams) -> None:
    resp = _chat(gateway, "500-then-ok")
    assert resp.status_code == 200 and resp.headers["x-kiban-engine"] == "b"
    error = _error(_chat(gateway, "500-everywhere"), 500)  # all fail: the last one's error
    assert "injected HTTP 500" in error["message"]


def test_429_keeps_retry_after(gateway) -> None:
    resp = _chat(gateway, "status-429")
    _error(resp, 429)
    assert resp.headers["retry-after"] == "7"


def test_failing_engine_ejected_then_readmitted(gateway, upstreams) -> None:
    a = upstreams["a"]
    httpx.post(a.base_url + "/fault", json={"mode": "status-500"})
    started = time.monotonic()  # the circuit opens after this, during the next six requests
    engines = [_chat(gateway, "ok").headers["x-kiban-engine"] for _ in range(6)]
    assert engines == ["b"] * 6  # every request answered, by b, after a failed
    received = _received(a, "ok")
    for _ in range(5):
        assert _chat(gateway, "ok").headers["x-kiban-engine"] == "b"
    # ejected: a gets nothing while its circuit is open, only one probe per cooldown that
    # ended since it opened (none at all unless this loaded machine took longer than a cooldown)
    probes_allowed = int((time.monotonic() - started) // A_COOLDOWN_S)
    assert _received(a, "ok") - received <= probes_allowed
    text = httpx.get(gateway.base_url + "/metrics").text
    assert 'kiban_engine_circuit_state{engine="a"} 2.0' in text
    httpx.post(a.base_url + "/fault", json={"mode": None})
    deadline = time.monotonic() + 4 * A_COOLDOWN_S
    engine = "b"
    while engine != "a" and time.monotonic() < deadline:
        time.sleep(0.3)  # after the cooldown one probe passes and closes the circuit
        engine = _chat(gateway, "ok").headers["x-kiban-engine"]
    assert engine == "a"
    assert _chat(gateway, "ok").headers["x-kiban-engine"] == "a"
