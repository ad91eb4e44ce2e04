"""The route's failover policy and the stream checks, behind a real `kiban serve` process.

Fault-injecting upstreams (tests/support/fault_upstream.py) play the engines:
complete streams without ``[DONE]``, each engine's own context-length refusal,
a content-policy refusal, a single 500 or 429 before recovering, engines that
never answer, malformed and error events, and a connection closed while the
engine holds the request. Each test says what the client gets, which engines
were asked, and what the request log and the metrics recorded.
"""

from __future__ import annotations

import json
import re
import time

import httpx
import pytest

from tests.support.engines import EngineProcess
from tests.support.gateway import fault_upstream, gateway_process

KINDS = ("vllm", "llamacpp", "sglang", "lmdeploy", "openai")
SHORT = [{"role": "user", "content": "hi"}]
LONG = [{"role": "user", "content": "x" * 200}]  # more than a 50-character context
COOLDOWN_S = 30.0


@pytest.fixture(scope="module")
def upstreams(tmp_path_factory: pytest.TempPathFactory):
    log_dir = tmp_path_factory.mktemp("failover")
    started = {n: fault_upstream(log_dir, slow_interval=0.25).start() for n in ("a", "b")}
    yield started
    for upstream in started.values():
        upstream.stop()


@pytest.fixture(scope="module")
def gateway(upstreams, tmp_path_factory: pytest.TempPathFactory):
    url = {name: u.base_url for name, u in upstreams.items()}
    circuit = {"failures": 2, "cooldown_s": COOLDOWN_S}

    def engine(name: str, side: str, model: str, **extra) -> dict:
        return {"name": name, "kind": "openai", "url": url[side], "models": [model], **extra}

    engines = [
        engine("a", "a", "ok", circuit=circuit),
        engine("b", "b", "ok"),
        engine("a-finished", "a", "finished-no-done", circuit=circuit),
        engine("a-content-filter", "a", "content-filter"),
        engine("a-hang", "a", "hang"),
        engine("a-429-long", "a", "status-429-ra-30"),
        engine("a-malformed", "a", "malformed"),
        engine("a-malformed-first", "a", "malformed-first"),
        engine("a-error-event", "a", "error-event"),
        # a smaller context than the refusing engine's: asked last, if at all
        engine("b-smaller", "b", "ctx-vllm-40", kind="vllm", context=40),
        engine("b-larger", "b", "ctx-vllm-1000", kind="vllm", context=1000),
    ]
    routes = [
        {"model": "ok", "engines": ["a", "b"]},
        {"model": "only-a", "engines": ["a"]},
        {"model": "finished", "engines": ["a-finished", "b"]},
        {"model": "content-filter", "engines": ["a-content-filter", "b"]},
        {
            "model": "hang-then-b",
            "engines": ["a-hang", "b"],
            "timeouts": {"ttft_s": 1, "total_s": 1},
        },
        {"model": "429-past-deadline", "engines": ["a-429-long", "b"], "timeouts": {"total_s": 5}},
        {"model": "malformed", "engines": ["a-malformed", "b"]},
        {"model": "malformed-first", "engines": ["a-malformed-first", "b"]},
        {"model": "error-event", "engines": ["a-error-event", "b"]},
    ]
    for kind in KINDS:
        engines.append(engine(f"a-ctx-{kind}", "a", f"ctx-{kind}-50", kind=kind, context=50))
        routes.append(
            {"model": f"ctx-{kind}", "engines": [f"a-ctx-{kind}", "b-smaller", "b-larger"]}
        )
    routes.append({"model": "ctx-alone", "engines": ["a-ctx-vllm"]})
    routes.append(
        {"model": "ctx-off", "engines": ["a-ctx-vllm", "b"], "failover": {"context_length": "off"}}
    )
    config = {
        "gateway": {"health_interval_s": 600, "health_timeout_s": 1},
        "engines": engines,
        "routes": routes,
    }
    gw = gateway_process(config, tmp_path_factory.mktemp("gw"), name="failover")
    gw.start(timeout=60)
    yield gw
    gw.stop()


@pytest.fixture(autouse=True)
def healthy(upstreams):
    for upstream in upstreams.values():
        httpx.post(upstream.base_url + "/fault", json={"mode": None})
    yield
    for upstream in upstreams.values():
        httpx.post(upstream.base_url + "/fault", json={"mode": None})


def _chat(gw: EngineProcess, model: str, messages=SHORT, **body) -> httpx.Response:
    return httpx.post(
        gw.base_url + "/v1/chat/completions",
        json={"model": model, "messages": messages, **body},
        timeout=30,
    )


def _stream(gw: EngineProcess, model: str, messages=SHORT) -> tuple[httpx.Response, list[str]]:
    with httpx.stream(
        "POST",
        gw.base_url + "/v1/chat/completions",
        json={"model": model, "messages": messages, "stream": True},
        timeout=30,
    ) as resp:
        text = resp.read().decode()
    return resp, [e for e in text.split("\n\n") if e.strip()]


def _received(upstream: EngineProcess, model: str) -> int:
    return httpx.get(upstream.base_url + "/stats").json()["requests"].get(model, 0)


def _log_of(gw: EngineProcess, resp: httpx.Response) -> dict:
    rid = resp.headers["x-request-id"]
    text = gw.wait_for_log(f'"request_id":"{rid}"')
    return next(json.loads(line) for line in text.splitlines() if f'"request_id":"{rid}"' in line)


def _metric(gw: EngineProcess, name: str, **labels: str) -> float:
    text = httpx.get(gw.base_url + "/metrics").text
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    match = re.search(rf"^{name}\{{{re.escape(wanted)}\}} ([\d.e+]+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


def _contents(events: list[str]) -> str:
    return "".join(
        c["delta"].get("content") or ""
        for e in events
        if e != "data: [DONE]" and "choices" in e
        for c in json.loads(e[6:])["choices"]
    )


# -- complete streams ---------------------------------------------------------------------------


def test_finished_stream_without_done_is_a_success(gateway, upstreams) -> None:
    before = _received(upstreams["b"], "ok")
    for _ in range(4):  # more than the circuit's 2 failures: it stays closed
        resp, events = _stream(gateway, "finished")
        assert resp.status_code == 200 and resp.headers["x-kiban-engine"] == "a-finished"
        assert events[-1] == "data: [DONE]"  # sent by kiban
        assert _contents(events) == "ab"
        # kiban asked for the usage, the client did not: counted (below), not relayed
        assert not any('"usage"' in e for e in events)
    entry = _log_of(gateway, resp)
    assert entry["error"] is None and entry["completion_tokens"] == 2 and entry["attempts"] == 1
    assert _received(upstreams["b"], "ok") == before
    assert _metric(gateway, "kiban_engine_circuit_state", engine="a-finished") == 0.0
    failures = "kiban_upstream_failures_total"
    assert _metric(gateway, failures, engine="a-finished", reason="broken", route="finished") == 0


# -- context length -------------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
@pytest.mark.parametrize("kind", KINDS)
def test_context_length_refusal_moves_to_a_larger_context(gateway, upstreams, kind, stream):
    a, b = upstreams["a"], upstreams["b"]
    before = {m: _received(b, m) for m in ("ctx-vllm-40", "ctx-vllm-1000")}
    refusing = _received(a, f"ctx-{kind}-50")
    if stream:
        resp, events = _stream(gateway, f"ctx-{kind}", LONG)
        assert events[-1] == "data: [DONE]" and _contents(events)
    else:
        resp = _chat(gateway, f"ctx-{kind}", LONG)
        assert resp.json()["choices"][0]["message"]["content"]
    assert resp.status_code == 200 and resp.headers["x-kiban-engine"] == "b-larger"
    # the refusing engine once (never again), the smaller one not at all
    assert _received(a, f"ctx-{kind}-50") == refusing + 1
    assert _received(b, "ctx-vllm-40") == before["ctx-vllm-40"]
    assert _received(b, "ctx-vllm-1000") == before["ctx-vllm-1000"] + 1
    entry = _log_of(gateway, resp)
    assert entry["attempts"] == 2 and entry["retries"] == ["context_length"]
    # a prompt that fits stays on the first engine
    resp = _chat(gateway, f"ctx-{kind}", SHORT)
    assert resp.status_code == 200 and resp.headers["x-kiban-engine"] == f"a-ctx-{kind}"


def test_context_length_refusal_alone_or_off_reaches_the_client(gateway, upstreams) -> None:
    a = upstreams["a"]
    before = _received(a, "ctx-vllm-50")
    resp = _chat(gateway, "ctx-alone", LONG)
    assert resp.status_code == 400
    assert "maximum context length is 50 tokens" in resp.json()["error"]["message"]
    assert _received(a, "ctx-vllm-50") == before + 1  # never the same engine twice
    resp = _chat(gateway, "ctx-off", LONG)
    assert resp.status_code == 400 and resp.headers["x-kiban-engine"] == "a-ctx-vllm"
    assert _log_of(gateway, resp)["attempts"] == 1


def test_content_policy_refusal_does_not_fail_over(gateway, upstreams) -> None:
    before = _received(upstreams["b"], "ok")
    resp = _chat(gateway, "content-filter")
    assert resp.status_code == 400
    assert resp.json()["error"]["code"] == "content_policy_violation"
    assert _received(upstreams["b"], "ok") == before
    assert _log_of(gateway, resp)["attempts"] == 1


# -- the same engine again ---------------------------------------------------------------------


def test_single_500_then_healthy_is_retried_on_the_same_engine(gateway, upstreams) -> None:
    httpx.post(upstreams["a"].base_url + "/fault", json={"mode": "status-500", "times": 1})
    before = _metric(gateway, "kiban_retries_total", reason="status", route="only-a")
    resp = _chat(gateway, "only-a")
    assert resp.status_code == 200 and resp.headers["x-kiban-engine"] == "a"
    entry = _log_of(gateway, resp)
    assert entry["attempts"] == 2 and entry["retries"] == ["status"]
    after = _metric(gateway, "kiban_retries_total", reason="status", route="only-a")
    assert after == before + 1


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_429_retry_after_is_waited_out_on_the_same_engine(gateway, upstreams, stream) -> None:
    httpx.post(upstreams["a"].base_url + "/fault", json={"mode": "status-429-ra-1", "times": 1})
    started = time.monotonic()
    resp = _stream(gateway, "only-a")[0] if stream else _chat(gateway, "only-a")
    assert time.monotonic() - started >= 1.0  # the engine's Retry-After, not kiban's backoff
    assert resp.status_code == 200 and resp.headers["x-kiban-engine"] == "a"
    assert _log_of(gateway, resp)["retries"] == ["status"]


def test_retry_after_past_the_deadline_moves_on_at_once(gateway) -> None:
    started = time.monotonic()
    resp = _chat(gateway, "429-past-deadline")  # Retry-After 30 s, total_s 5
    assert time.monotonic() - started < 3
    assert resp.status_code == 200 and resp.headers["x-kiban-engine"] == "b"


def test_connection_closed_while_held_is_a_counted_attempt(gateway, upstreams) -> None:
    """A reused keep-alive connection that the engine closes 0.3 s after the request: the
    engine may have had it, so it is an attempt in the log, retried by the route's policy."""
    a = upstreams["a"]
    assert _chat(gateway, "only-a").status_code == 200  # leaves a keep-alive connection
    httpx.post(a.base_url + "/fault", json={"mode": "close-after-0.3", "times": 1})
    before = _received(a, "ok")
    resp = _chat(gateway, "only-a")
    assert resp.status_code == 200 and resp.headers["x-kiban-engine"] == "a"
    entry = _log_of(gateway, resp)
    assert entry["attempts"] == 2 and entry["retries"] == ["broken"]
    assert _received(a, "ok") == before + 2


# -- deadlines ------------------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True], ids=["plain-total", "stream-ttft"])
def test_engine_that_never_answers_costs_one_deadline(gateway, stream) -> None:
    started = time.monotonic()
    resp = _stream(gateway, "hang-then-b")[0] if stream else _chat(gateway, "hang-then-b")
    elapsed = time.monotonic() - started
    assert resp.status_code == 200 and resp.headers["x-kiban-engine"] == "b"
    assert 1.0 <= elapsed < 5
    assert _log_of(gateway, resp)["retries"] == ["timeout"]


# -- malformed and error events -----------------------------------------------------------------


def test_malformed_event_is_never_relayed(gateway) -> None:
    resp, events = _stream(gateway, "malformed")
    assert resp.status_code == 200 and resp.headers["x-kiban-engine"] == "a-malformed"
    assert _contents(events[:-1]) == "a" and "data: [DONE]" not in events
    assert all(json.loads(e[6:]) for e in events)  # every event parses
    error = json.loads(events[-1][6:])["error"]
    assert error["code"] == "upstream_stream_malformed" and "invalid JSON" in error["message"]


def test_malformed_first_event_fails_over(gateway) -> None:
    resp, events = _stream(gateway, "malformed-first")
    assert resp.status_code == 200 and resp.headers["x-kiban-engine"] == "b"
    assert events[-1] == "data: [DONE]"
    assert _log_of(gateway, resp)["retries"] == ["malformed"]  # not the same engine again


def test_error_event_from_the_engine_ends_the_stream(gateway) -> None:
    resp, events = _stream(gateway, "error-event")
    assert resp.status_code == 200 and "data: [DONE]" not in events
    assert _contents(events[:-1]) == "a"
    error = json.loads(events[-1][6:])["error"]
    assert error["code"] == "upstream_stream_error" and "Generation aborted" in error["message"]
