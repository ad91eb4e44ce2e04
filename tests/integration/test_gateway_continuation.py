"""A stream whose engine breaks mid-answer goes on on another engine (gateway/continuation.py).

A real `kiban serve` in front of the fault-injecting upstream's ``words`` behaviours
(tests/support/fault_upstream.py): an answer of numbered words ``w0 w1 ...`` that a
second engine continues, as vLLM does, from the word after a final assistant
message. So the uninterrupted answer is known, and a continued one must equal it:
no word twice, none missing. The same with real engines killed by PID is in
test_continuation_real_engines.py.
"""

from __future__ import annotations

import json
import re

import httpx
import pytest

from tests.support.engines import EngineProcess
from tests.support.gateway import fault_upstream, gateway_process

CHAT = [{"role": "user", "content": "count"}]
WORDS = 12


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory):
    upstream = fault_upstream(tmp_path_factory.mktemp("fault")).start()
    url = upstream.base_url

    def engine(name: str, model: str, kind: str = "vllm") -> dict:
        # engines that break on purpose keep their circuits closed: every test meets the break
        circuit = {"failures": 1000} if "-" in model else {}
        return {"name": name, "kind": kind, "url": url, "models": [model], "circuit": circuit}

    def route(model: str, *engines: str, **extra) -> dict:
        return {"model": model, "engines": list(engines), "strategy": "priority", **extra}

    config = {
        "gateway": {"health_interval_s": 600, "health_timeout_s": 1},
        "engines": [
            engine("a", "words-cut-5"),
            engine("a-stall", "words-stall-5"),
            engine("b", "words"),
            engine("b-cut", "words-cut-3"),
            engine("generic", "words", kind="openai"),
            engine("b-400", "status-400"),
            # a loaded vLLM: 3 tokens an event, cut after 6 (two events)
            engine("a-merged", "words-merge-3-cut-6"),
            engine("b-merged", "words-merge-4"),
            engine("b-malformed", "words-malformed-2"),
            engine("b-nodone", "words-nodone"),
        ],
        "routes": [
            route("cut", "a", "b"),
            route("stall", "a-stall", "b", timeouts={"idle_s": 1}),
            route("cut-twice", "a", "b-cut", "b"),
            route("cut-no-continuation", "a", "b", continue_streams=False),
            route("cut-generic", "a", "generic"),
            route("cut-refused", "a", "b-400"),
            route("words", "b"),
            route("merged", "a-merged", "b-merged"),
            route("cut-malformed", "a", "b-malformed"),
            route("cut-malformed-then-b", "a", "b-malformed", "b"),
            route("cut-nodone", "a", "b-nodone"),
        ],
    }
    gw = gateway_process(config, tmp_path_factory.mktemp("gw"), name="continuation")
    gw.start(timeout=60)
    yield gw
    gw.stop()
    upstream.stop()


def _stream(gateway: EngineProcess, model: str, **extra) -> tuple[httpx.Response, list[dict]]:
    """One streamed chat request; the response and its events (``[DONE]`` as a string)."""
    body = {"model": model, "messages": CHAT, "max_tokens": WORDS, "stream": True, **extra}
    with httpx.stream(
        "POST", f"{gateway.base_url}/v1/chat/completions", json=body, timeout=30
    ) as resp:
        raw = resp.read().decode()
    assert raw.endswith("\n\n"), raw[-200:]
    events = []
    for block in raw.split("\n\n")[:-1]:
        assert block.startswith("data: "), block
        data = block.removeprefix("data: ")
        events.append(data if data == "[DONE]" else json.loads(data))
    return resp, events


def _text(events: list) -> str:
    return "".join(
        e["choices"][0]["delta"].get("content") or ""
        for e in events
        if isinstance(e, dict) and e.get("choices")
    )


def _uninterrupted(count: int = WORDS) -> str:
    return "".join(f"w{i} " for i in range(count))


def _log_entry(gateway: EngineProcess, request_id: str) -> dict:
    line = next(ln for ln in gateway.wait_for_log(request_id).splitlines() if request_id in ln)
    return json.loads(line)


def test_cut_mid_stream_is_continued_on_another_engine(gateway: EngineProcess) -> None:
    resp, events = _stream(
        gateway,
        "cut",
        stream_options={"include_usage": True},
        min_tokens=WORDS,
    )
    assert resp.status_code == 200 and resp.headers["x-kiban-engine"] == "a"
    assert _text(events) == _uninterrupted()
    assert events[-1] == "[DONE]" and events.count("[DONE]") == 1
    chunks = events[:-1]
    assert not any("error" in e for e in chunks)
    # one stream as the client sees it: a's id, created and model on every event
    assert {(e["id"], e["created"], e["model"]) for e in chunks} == {
        (chunks[0]["id"], chunks[0]["created"], "words-cut-5")
    }
    roles = [e for e in chunks if e["choices"] and "role" in e["choices"][0]["delta"]]
    assert len(roles) == 1  # b's role-only opener was dropped
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    # usage: a's 5 words plus b's 7; b's prompt held the 5 words of prefix
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == {"prompt_tokens": 10, "completion_tokens": 12, "total_tokens": 22}

    entry = _log_entry(gateway, resp.headers["x-request-id"])
    assert entry["status"] == 200 and entry["error"] is None and entry["attempts"] == 2
    assert entry["completion_tokens"] == 12
    assert entry["continuations"] == [
        {"from": "a", "to": "b", "continued_at": 5, "outcome": "continued"}
    ]
    metrics = httpx.get(f"{gateway.base_url}/metrics").text
    assert re.search(
        r'kiban_stream_continuations_total\{from_engine="a",outcome="continued",'
        r'route="cut",to_engine="b"\} [1-9]',
        metrics,
    )


def test_continuation_sends_what_vllm_needs(gateway: EngineProcess) -> None:
    """b answers 400 unless the request continues a final assistant message as vLLM
    wants it, and counts from the prefix's words: the text above already shows both; here
    without usage asked for, no usage event reaches the client."""
    _, events = _stream(gateway, "cut")
    assert _text(events) == _uninterrupted()
    assert not any(isinstance(e, dict) and e.get("usage") for e in events)


def test_stall_mid_stream_is_continued(gateway: EngineProcess) -> None:
    resp, events = _stream(gateway, "stall")
    assert _text(events) == _uninterrupted() and events[-1] == "[DONE]"
    entry = _log_entry(gateway, resp.headers["x-request-id"])
    assert entry["continuations"][0]["continued_at"] == 5


def test_a_continuation_that_breaks_goes_on_on_a_third_engine(gateway: EngineProcess) -> None:
    resp, events = _stream(gateway, "cut-twice")
    assert _text(events) == _uninterrupted() and events[-1] == "[DONE]"
    entry = _log_entry(gateway, resp.headers["x-request-id"])
    assert entry["continuations"] == [
        {"from": "a", "to": "b-cut", "continued_at": 5, "outcome": "broken"},
        {"from": "b-cut", "to": "b", "continued_at": 8, "outcome": "continued"},
    ]


def _ends_with_error(events: list, code: str) -> dict:
    assert "[DONE]" not in events
    error = events[-1]["error"]
    assert error["code"] == code and error["type"] == "upstream_error"
    assert _text(events) == _uninterrupted(5)  # what a sent, nothing more
    return error


@pytest.mark.parametrize(
    "extra",
    [
        {"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]},
        {"n": 2},
        {"logprobs": True},
        {"response_format": {"type": "json_object"}},
        {"guided_regex": "w.*"},
    ],
    ids=["tools", "n", "logprobs", "structured", "guided"],
)
def test_no_continuation_for_what_a_prefix_cannot_carry(gateway: EngineProcess, extra) -> None:
    resp, events = _stream(gateway, "cut", **extra)
    error = _ends_with_error(events, "upstream_stream_broken")
    assert "not continued" not in error["message"]
    assert "continuations" not in _log_entry(gateway, resp.headers["x-request-id"])


def test_no_continuation_when_the_route_turns_it_off(gateway: EngineProcess) -> None:
    _, events = _stream(gateway, "cut-no-continuation")
    _ends_with_error(events, "upstream_stream_broken")


def test_no_continuation_when_no_other_engine_can(gateway: EngineProcess) -> None:
    resp, events = _stream(gateway, "cut-generic")
    error = _ends_with_error(events, "upstream_stream_broken")
    assert (
        "not continued: no other engine of model 'cut-generic' can continue it"
        in (error["message"])
    )
    entry = _log_entry(gateway, resp.headers["x-request-id"])
    assert entry["continuations"] == [
        {"from": "a", "to": "none", "continued_at": 5, "outcome": "unavailable"}
    ]


def test_error_event_when_the_other_engine_refuses_to_continue(gateway: EngineProcess) -> None:
    resp, events = _stream(gateway, "cut-refused")
    error = _ends_with_error(events, "upstream_stream_broken")
    assert "not continued: engine 'b-400' answered 400" in error["message"]
    entry = _log_entry(gateway, resp.headers["x-request-id"])
    assert entry["continuations"][0]["outcome"] == "failed"


def test_an_answer_without_a_break_is_untouched(gateway: EngineProcess) -> None:
    _, events = _stream(gateway, "words", stream_options={"include_usage": True})
    assert _text(events) == _uninterrupted()
    assert {e["id"] for e in events[:-1]} == {"chatcmpl-words"}
    assert events[-2]["usage"]["completion_tokens"] == WORDS


def _usages(events: list) -> list[dict]:
    return [e["usage"] for e in events if isinstance(e, dict) and e.get("usage")]


def test_merged_events_are_counted_by_the_engine_and_the_limit_holds(
    gateway: EngineProcess,
) -> None:
    """a sends 6 tokens in two events (as a loaded vLLM merges them) and breaks: counted as
    events, b would be asked for 10 more and the answer would run 4 past max_tokens. With
    vLLM's per-event usage (fault_upstream._words, its continuous_usage_stats shape) b
    is asked for exactly 6, and the usage is what both wrote."""
    resp, events = _stream(gateway, "merged", stream_options={"include_usage": True})
    assert resp.headers["x-kiban-engine"] == "a-merged"
    assert _text(events) == _uninterrupted()  # 12 words: max_tokens, not one more
    assert events[-1] == "[DONE]" and events.count("[DONE]") == 1
    # the per-event usage kiban asked for never reaches the client: one usage event, last
    assert _usages(events) == [{"prompt_tokens": 10, "completion_tokens": 12, "total_tokens": 22}]
    assert events[-2]["choices"] == []
    entry = _log_entry(gateway, resp.headers["x-request-id"])
    assert entry["completion_tokens"] == 12 and entry["prompt_tokens"] == 10
    assert entry["continuations"] == [
        {"from": "a-merged", "to": "b-merged", "continued_at": 6, "outcome": "continued"}
    ]


def test_merged_events_without_usage_asked_carry_none(gateway: EngineProcess) -> None:
    _, events = _stream(gateway, "merged")
    assert _text(events) == _uninterrupted()
    assert _usages(events) == []


def test_a_client_that_asks_for_usage_on_every_event_gets_it_summed(
    gateway: EngineProcess,
) -> None:
    options = {"include_usage": True, "continuous_usage_stats": True}
    _, events = _stream(gateway, "merged", stream_options=options)
    assert _text(events) == _uninterrupted()
    chunks = [e for e in events if isinstance(e, dict) and e["choices"]]
    assert all("usage" in e for e in chunks)
    counts = [e["usage"]["completion_tokens"] for e in chunks]
    assert counts == [0, 3, 6, 10, 12]  # a's opener and events, then b's, counted from a's 6
    assert _usages(events)[-1] == {"prompt_tokens": 10, "completion_tokens": 12, "total_tokens": 22}


def test_a_malformed_event_while_continuing_is_a_break(gateway: EngineProcess) -> None:
    """b-malformed continues with two words, then sends an event whose JSON is cut: it is
    never forwarded; the stream ends with the error event, or goes on on a third engine."""
    resp, events = _stream(gateway, "cut-malformed")
    assert "[DONE]" not in events
    assert events[-1]["error"]["code"] == "upstream_stream_broken"
    assert "malformed event while continuing" in events[-1]["error"]["message"]
    assert _text(events) == _uninterrupted(7)  # a's 5, b-malformed's 2, nothing else
    entry = _log_entry(gateway, resp.headers["x-request-id"])
    assert [c["outcome"] for c in entry["continuations"]] == ["broken", "failed"]

    resp, events = _stream(gateway, "cut-malformed-then-b")
    assert _text(events) == _uninterrupted() and events[-1] == "[DONE]"
    entry = _log_entry(gateway, resp.headers["x-request-id"])
    assert entry["continuations"] == [
        {"from": "a", "to": "b-malformed", "continued_at": 5, "outcome": "broken"},
        {"from": "b-malformed", "to": "b", "continued_at": 7, "outcome": "continued"},
    ]


def test_a_continuing_engine_that_finishes_without_done_completes_the_answer(
    gateway: EngineProcess,
) -> None:
    resp, events = _stream(gateway, "cut-nodone", stream_options={"include_usage": True})
    assert _text(events) == _uninterrupted()
    assert events[-1] == "[DONE]" and events.count("[DONE]") == 1  # kiban's own
    assert _usages(events) == [{"prompt_tokens": 10, "completion_tokens": 12, "total_tokens": 22}]
    entry = _log_entry(gateway, resp.headers["x-request-id"])
    assert entry["status"] == 200 and entry["error"] is None
    assert entry["continuations"] == [
        {"from": "a", "to": "b-nodone", "continued_at": 5, "outcome": "continued"}
    ]
