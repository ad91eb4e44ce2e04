"""cache_aware and session routing over two real llama-servers.

Conversations keep their engine turn after turn and both engines serve; one
hot prompt from several workers is split by the balance guard; the gateway
reads the engines' own load from their /metrics; an engine
killed under session load hands its sessions to the other without a failed
request.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path

import httpx
import pytest
from openai import OpenAI
from prometheus_client.parser import text_string_to_metric_families

from kiban.engines import ENGINE_KINDS
from kiban.gateway.engine_load import read_load
from tests.support.engines import EngineProcess
from tests.support.gateway import gateway_process
from tests.support.load import background_load

pytestmark = pytest.mark.engine
ENGINES = ("e0", "e1")
SYSTEM = "You are a helpful assistant of the kiban test suite. " * 12  # ~650 bytes


@pytest.fixture(scope="module")
def pair(llamacpp_engine_factory, tiny_gguf: Path) -> list[EngineProcess]:
    # one thread each, as in test_two_engines_balance: two servers share the 2 cores
    return [
        llamacpp_engine_factory(tiny_gguf, "tiny", ctx=8192, parallel=4, extra_args=("-t", "1"))
        for _ in range(2)
    ]


@pytest.fixture(scope="module")
def gateway(pair, tmp_path_factory: pytest.TempPathFactory):
    targets = [{"engine": name, "model": "tiny"} for name in ENGINES]
    config = {
        "gateway": {"health_interval_s": 0.5, "engine_load_interval_s": 1.0},
        "engines": [
            {"name": name, "kind": "llamacpp", "url": e.base_url, "models": ["tiny"],
             "circuit": {"failures": 1, "cooldown_s": 30}}
            for name, e in zip(ENGINES, pair, strict=True)
        ],
        "routes": [
            {"model": "cached", "engines": targets, "strategy": "cache_aware"},
            {"model": "sticky", "engines": targets, "strategy": "session"},
        ],
    }  # fmt: skip
    gw = gateway_process(config, tmp_path_factory.mktemp("affinity")).start(timeout=60)
    yield gw
    gw.stop()


def _client(gateway) -> OpenAI:
    return OpenAI(base_url=f"{gateway.base_url}/v1", api_key="none", max_retries=0, timeout=60)


def _decisions(gateway, route: str) -> dict[str, float]:
    text = httpx.get(f"{gateway.base_url}/metrics", timeout=10).text
    return {
        s.labels["outcome"]: s.value
        for family in text_string_to_metric_families(text)
        if family.name == "kiban_route_affinity_decisions"
        for s in family.samples
        if s.name.endswith("_total") and s.labels["route"] == route
    }


def test_turns_of_each_conversation_stay_on_one_engine(gateway) -> None:
    client = _client(gateway)
    # five chats, interleaved: plain rotation would move every chat at every turn
    histories = {n: [{"role": "system", "content": f"Chat {n}. {SYSTEM}"}] for n in range(5)}
    served: dict[int, list[str]] = defaultdict(list)
    cached_tokens: list[int] = []
    for turn in range(4):
        for n, history in histories.items():
            history.append({"role": "user", "content": f"Turn {turn} of chat {n}: go on."})
            raw = client.chat.completions.with_raw_response.create(
                model="cached", messages=history, max_tokens=8
            )
            completion = raw.parse()
            served[n].append(raw.headers["x-kiban-engine"])
            answer = completion.choices[0].message.content or "..."
            history.append({"role": "assistant", "content": answer})
            if turn:
                details = completion.usage.prompt_tokens_details if completion.usage else None
                cached_tokens.append(getattr(details, "cached_tokens", None) or 0)
    print(f"engines per chat: {dict(served)}; cached prompt tokens after turn 1: {cached_tokens}")
    assert all(len(set(engines)) == 1 for engines in served.values()), served
    assert {engines[0] for engines in served.values()} == set(ENGINES), served
    decisions = _decisions(gateway, "cached")
    assert decisions["hit"] >= 15 and decisions["miss"] <= 5, decisions


def test_guard_splits_one_hot_prompt_over_both_engines(gateway) -> None:
    client = _client(gateway)
    hot = [{"role": "system", "content": f"Hot. {SYSTEM}"}, {"role": "user", "content": "Go."}]
    guarded_before = _decisions(gateway, "cached").get("guard", 0)

    def one_request() -> str:
        raw = client.chat.completions.with_raw_response.create(
            model="cached", messages=hot, max_tokens=32
        )
        raw.parse()
        return raw.headers["x-kiban-engine"]

    with background_load(one_request, workers=6, max_requests=600, max_seconds=6.0) as load:
        load.run_out()
    assert load.failure_count == 0, load.describe_failures()
    served = Counter(load.results)
    total = sum(served.values())
    print(f"hot prompt per engine: {dict(served)}")
    # without the guard every request would follow the prefix to the one engine that holds it
    assert total >= 20 and min(served[e] for e in ENGINES) >= total * 0.2, served
    assert _decisions(gateway, "cached").get("guard", 0) > guarded_before


def test_engine_load_reads_the_real_llamacpp_metrics(pair) -> None:
    text = httpx.get(f"{pair[0].base_url}/metrics", timeout=10).content
    load = read_load(text, ENGINE_KINDS["llamacpp"].metrics.names)
    assert load.waiting == 0.0 and load.kv_usage is None  # idle; llama.cpp exports no KV use


def test_sessions_move_without_failures_when_their_engine_dies(pair, gateway) -> None:
    client = _client(gateway)
    sessions = itertools.cycle([f"user-{n}" for n in range(8)])
    lock = threading.Lock()

    def one_request() -> tuple[float, float, str, str]:
        with lock:
            session = next(sessions)
        started = time.monotonic()
        raw = client.chat.completions.with_raw_response.create(
            model="sticky",
            messages=[{"role": "user", "content": f"Hello from {session}."}],
            max_tokens=16,
            extra_headers={"X-Session-ID": session},
        )
        raw.parse()
        return started, time.monotonic(), session, raw.headers["x-kiban-engine"]

    with background_load(one_request, workers=4, max_requests=2000, max_seconds=8.0) as load:
        time.sleep(3.0)
        kill_from = time.monotonic()
        pair[1].kill()  # e1 dies under load
        killed_at = time.monotonic()
        load.run_out()
    assert load.failure_count == 0, load.describe_failures()
    before: dict[str, set[str]] = defaultdict(set)
    after: dict[str, set[str]] = defaultdict(set)
    for started, ended, session, engine in load.results:
        if ended < kill_from:
            before[session].add(engine)
        elif started > killed_at:
            after[session].add(engine)
    print(f"sessions before the kill: {dict(before)}; after: {dict(after)}")
    # at most 4 in flight: the load bound (4) never moves a session while both engines live
    assert all(len(engines) == 1 for engines in before.values()), before
    moved = [s for s, engines in before.items() if engines == {"e1"}]
    assert moved and len(moved) < len(before), before
    assert all(after[s] == {"e0"} for s in moved), after
