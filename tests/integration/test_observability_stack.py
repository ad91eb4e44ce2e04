"""The whole observability stack, real: Prometheus (Debian) scraping a kiban gateway in
front of a real vLLM CPU engine, with the rules and dashboards `kiban observability render`
writes. Every dashboard query must return data, except the GPU ones (no GPU here)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from kiban.observability.report import Prometheus
from tests.support.dashboards import empty_panels, panel_queries
from tests.support.engines import EngineProcess
from tests.support.observed_stack import KIBAN, observed_stack

pytestmark = [pytest.mark.engine, pytest.mark.timeout(900)]

ENGINE = "vllm-tiny"
REQUESTS = 30
CONCURRENCY = 3


@dataclass
class Stack:
    config: Path
    gateway: EngineProcess
    prometheus: EngineProcess
    dashboards: list[Path]

    @property
    def prom(self) -> Prometheus:
        return Prometheus(self.prometheus.base_url)


@pytest.fixture(scope="module")
def stack(vllm_engine_factory, tiny_model_dir: Path, tmp_path_factory) -> Iterator[Stack]:
    engine = vllm_engine_factory(tiny_model_dir, "tiny")
    root = tmp_path_factory.mktemp("observability")
    described = {
        "name": ENGINE,
        "kind": "vllm",
        "url": engine.base_url,
        "models": ["tiny"],
        "launch": {"model": str(tiny_model_dir), "device": "cpu"},
    }
    with observed_stack(root, described) as running:
        dashboards = sorted((running.rendered / "grafana/dashboards").glob("*.json"))
        yield Stack(running.config, running.gateway, running.prometheus, dashboards)


def _wait_for(prom: Prometheus, query: str, timeout_s: float = 30) -> list:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        result = prom.query(query, time.time())
        if result:
            return result
        time.sleep(0.5)
    raise AssertionError(f"no result for {query!r} within {timeout_s}s")


async def _load(base_url: str) -> tuple[int, int]:
    """REQUESTS chat completions, half streamed; returns (statuses 200, completion tokens)."""
    gate = asyncio.Semaphore(CONCURRENCY)
    ok = tokens = 0

    async def one(session: aiohttp.ClientSession, i: int) -> None:
        nonlocal ok, tokens
        stream = i % 2 == 0
        body = {
            "model": "tiny",
            "messages": [{"role": "user", "content": f"Tell me about licence {i}."}],
            "max_tokens": 96 if stream else 16,
            "stream": stream,
        }
        if stream:
            body["stream_options"] = {"include_usage": True}
        async with gate, session.post(f"{base_url}/v1/chat/completions", json=body) as resp:
            raw = await resp.read()
            ok += resp.status == 200
            if stream:
                events = [e for e in raw.decode().split("\n\n") if e.startswith("data: {")]
                usage = [json.loads(e[6:]).get("usage") for e in events]
                usage = [u for u in usage if u]
                tokens += usage[-1]["completion_tokens"]
            else:
                tokens += json.loads(raw)["usage"]["completion_tokens"]

    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        await asyncio.gather(*(one(session, i) for i in range(REQUESTS)))
    return ok, tokens


def test_dashboards_and_report_on_a_real_stack(stack: Stack) -> None:
    prom = stack.prom
    for job in ("kiban-gateway", f"kiban-engine-{ENGINE}"):
        _wait_for(prom, f'up{{job="{job}"}} == 1')
    _wait_for(prom, "kiban:engine_requests_running")  # recording rules evaluate

    ok, client_tokens = asyncio.run(_load(stack.gateway.base_url))
    assert ok == REQUESTS
    # scrapes after the load: increase() extrapolates a counter's sampled span by up to about
    # 1.5 scrape intervals, which over a span of a few seconds overstates a short burst by 25%
    # or more (seen in CI: 37.4 for 30 requests); a longer flat tail keeps that under 10%
    time.sleep(15)
    at = time.time()

    # the gateway counted exactly what the engine reported to the clients
    gateway_tokens = prom.query('sum(kiban_tokens_total{type="completion"})', at)
    assert float(gateway_tokens[0]["value"][1]) == client_tokens

    queries = [q for path in stack.dashboards for q in panel_queries(path)]
    assert {q.dashboard for q in queries} == {"kiban-overview", "kiban-engine"}
    variables = {"__rate_interval": "1m", "engine": ENGINE}
    empty = empty_panels(prom, queries, variables, at)
    not_gpu = [f"{q.dashboard}: {q.panel} [{q.ref}]" for q in empty if not q.about_gpus]
    assert not_gpu == [], "panels without data"
    gpu_queries = [q for q in queries if q.about_gpus]
    assert gpu_queries and set(gpu_queries) == set(empty), "GPU panels with data on a CPU box"

    report = json.loads(
        subprocess.run(
            [
                KIBAN,
                "report",
                "-c",
                str(stack.config),
                "--period",
                "2m",
                "--json",
                "--end",
                str(at),
            ],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    )
    assert [g["gpu"] for g in report["gpus"]] == ["cpu"]
    cpu = report["gpus"][0]
    assert cpu["vram_high_share"] is None  # no GPU exporter here: unknown, not 0
    (engine,) = cpu["engines"]
    assert engine["engine"] == ENGINE and engine["kind"] == "vllm"
    assert REQUESTS * 0.8 <= engine["requests"] <= REQUESTS * 1.2
    assert engine["errors"] == 0
    assert 0 < engine["tokens_per_s"] <= engine["tokens_per_s_peak"] < 5000
    # tokens/s averaged over the 2 minutes cannot exceed what was generated in them
    assert engine["tokens_per_s"] * 120 <= client_tokens * 1.2
    assert engine["kv_saturated_share"] == 0
    assert 0 <= engine["kv_usage_peak"] <= 1  # tiny prompts: a sliver of the cache, maybe 0
    assert 0 <= engine["queued_share"] <= 1
    assert cpu["conclusions"] and "CPU engines" in cpu["conclusions"][0]
