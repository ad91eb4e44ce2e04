"""`kiban bench` against real servers on loopback: counts, streams, errors, the CLI.

Upstreams: bench/sse_upstream.py (streams ``max_tokens`` one-word chunks,
vLLM's chunk shapes, usage in the last chunk), the fault-injecting upstream
of tests/support, and a real `kiban serve` in front of it. No engine, a few
seconds in all; nothing here asserts a duration.
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from kiban.bench import LoadRunner, LoadShape, Summary, Workload
from kiban.bench.workload import Destination
from tests.support.engines import EngineProcess, free_port
from tests.support.gateway import KIBAN, REPO_ROOT, fault_upstream, gateway_process

KEY = "bench-test-key"


@pytest.fixture(scope="module")
def sse(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EngineProcess]:
    port = free_port()
    argv = [sys.executable, str(REPO_ROOT / "bench" / "sse_upstream.py"), "--port", str(port)]
    log = tmp_path_factory.mktemp("sse") / "sse.log"
    upstream = EngineProcess(name="sse-upstream", argv=argv, port=port, log_path=log).start(30)
    yield upstream
    upstream.stop()


@pytest.fixture(scope="module")
def fault(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EngineProcess]:
    upstream = fault_upstream(tmp_path_factory.mktemp("fault"), slow_interval=0.01).start(30)
    yield upstream
    upstream.stop()


@pytest.fixture(scope="module")
def gateway(fault: EngineProcess, tmp_path_factory: pytest.TempPathFactory):
    models = ["ok", "drop", "status-503"]
    config = {
        "gateway": {"api_keys": {"env": ["BENCH_TEST_KEY"]}, "health_interval_s": 0.5},
        # every "drop" stream is an engine failure: a circuit that opened after three of them
        # would answer the fourth with 503 (CI saw that race), so it never opens here
        "engines": [
            {
                "name": "up",
                "kind": "openai",
                "url": fault.base_url,
                "models": models,
                "circuit": {"failures": 1000},
            }
        ],
        "routes": [{"model": m, "engines": ["up"], "retries": {"attempts": 1}} for m in models],
    }
    gw = gateway_process(config, tmp_path_factory.mktemp("gw"), env={"BENCH_TEST_KEY": KEY})
    gw.start(60)
    yield gw
    gw.stop()


def run(url: str, model: str, **kwargs) -> Summary:
    """One in-process run; *kwargs* go to Workload (stream, max_tokens, api_key) or LoadShape."""
    workload_keys = {"stream", "max_tokens", "api_key", "include_usage"}
    workload = Workload(
        Destination.from_url(url), model, **{k: v for k, v in kwargs.items() if k in workload_keys}
    )
    shape = LoadShape(**{k: v for k, v in kwargs.items() if k not in workload_keys})
    recorder = asyncio.run(LoadRunner(workload, shape).run())
    return recorder.summary()


def test_closed_loop_counts_every_request_and_its_usage(sse: EngineProcess) -> None:
    s = run(sse.base_url, "bench", requests=60, concurrency=4, max_tokens=7)
    assert (s.requests, s.ok, s.errors) == (60, 60, {})
    assert s.latency_ms is not None and s.latency_ms.count == 60
    assert s.output_tokens == 60 * 7 and s.prompt_tokens == 60 * 12  # from each body's usage
    assert s.ttft_ms is None and s.stream_events == 0


def test_streams_are_timed_per_token(sse: EngineProcess) -> None:
    s = run(sse.base_url, "bench", requests=20, concurrency=4, stream=True, max_tokens=30)
    assert (s.ok, s.errors) == (20, {})
    assert s.token_events == 20 * 30
    assert s.stream_events == 20 * 33  # role chunk, 30 words, finish chunk, usage chunk
    assert s.output_tokens == 20 * 30 and s.usage_missing == 0
    assert s.ttft_ms is not None and s.ttft_ms.count == 20
    assert s.itl_ms is not None and s.itl_ms.count == 20 * 29
    assert s.ttft_ms.p50 <= s.latency_ms.p50


def test_completions_stream_without_usage_counts_chunks(sse: EngineProcess) -> None:
    url = sse.base_url + "/v1/completions"
    s = run(url, "bench", requests=6, concurrency=2, stream=True, max_tokens=9, include_usage=True)
    assert s.token_events == 6 * 9 and s.stream_events == 6 * 11  # no role chunk here
    assert s.output_tokens == 6 * 9


def test_open_loop_sends_the_requests_asked(sse: EngineProcess) -> None:
    s = run(sse.base_url, "bench", requests=40, rate=400.0, seed=1, max_tokens=3)
    assert (s.requests, s.ok) == (40, 40)
    assert s.latency_ms is not None and s.latency_ms.count == 40


def test_duration_bound_ends_the_run(sse: EngineProcess) -> None:
    s = run(sse.base_url, "bench", requests=None, duration_s=0.3, concurrency=2, max_tokens=3)
    assert s.requests > 0 and s.requests == s.ok


def test_warmup_is_not_counted(sse: EngineProcess) -> None:
    s = run(sse.base_url, "bench", requests=10, warmup=15, concurrency=3, max_tokens=2)
    assert s.requests == 10 and s.latency_ms is not None and s.latency_ms.count == 10


@pytest.mark.parametrize(
    ("model", "stream", "kind"),
    [
        ("status-503", False, "http_503"),
        ("status-429", True, "http_429"),
        ("no-done", True, "incomplete_stream"),
        ("drop", True, "disconnected"),
    ],
)
def test_errors_are_counted_by_kind(fault: EngineProcess, model: str, stream: bool, kind: str):
    s = run(fault.base_url, model, requests=6, concurrency=2, stream=stream)
    assert s.ok == 0 and s.errors == {kind: 6}
    assert s.error_samples[kind]


def test_timeouts_and_refused_connections() -> None:
    with socket.socket() as silent:  # the kernel accepts connections; nobody ever answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        s = run(f"http://127.0.0.1:{silent.getsockname()[1]}", "m", requests=3, timeout_s=0.3)
    assert s.errors == {"timeout": 3}
    s = run(f"http://127.0.0.1:{free_port()}", "m", requests=4, concurrency=2)
    assert s.errors == {"connect": 4} and "ConnectionRefusedError" in s.error_samples["connect"]


def test_through_kiban_auth_and_stream_errors(gateway: EngineProcess) -> None:
    s = run(gateway.base_url, "ok", requests=10, concurrency=2, api_key=KEY)
    assert (s.ok, s.errors) == (10, {})
    s = run(gateway.base_url, "ok", requests=4, concurrency=2, api_key="wrong")
    assert s.errors == {"http_401": 4}
    # the engine drops the connection mid-stream: kiban ends the stream with an error event
    s = run(gateway.base_url, "drop", requests=4, concurrency=2, stream=True, api_key=KEY)
    assert s.errors == {"stream_error": 4} and "upstream" in s.error_samples["stream_error"]


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(KIBAN), "bench", *args], capture_output=True, text=True, timeout=60)


def test_cli_json_finds_the_model(sse: EngineProcess, tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    done = _cli(sse.base_url, "-n", "12", "-c", "3", "--stream", "--max-tokens", "5", "--json")
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    assert doc["model"] == "bench" and doc["stream"] and doc["load"]["mode"] == "closed"
    assert doc["result"]["ok"] == 12 and doc["result"]["token_events"] == 60
    done = _cli(sse.base_url, "-n", "5", "-r", "100", "--seed", "3", "-q", "-o", str(out))
    assert done.returncode == 0, done.stderr
    assert "requests/s" in done.stdout and "latency" in done.stdout  # the table
    assert json.loads(out.read_text())["load"]["mode"] == "open"


def test_cli_failures_exit_non_zero_with_the_error_table(fault: EngineProcess) -> None:
    done = _cli(fault.base_url, "-m", "status-503", "-n", "3", "-q")
    assert done.returncode == 1
    assert "http_503" in done.stdout and "injected HTTP 503" in done.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["ftp://h"], "expected an http:// or https:// URL"),
        (["http://h", "--endpoint", "embeddings"], "expected chat or completions"),
        (["http://h", "--extra-body", "[1]"], "expected a JSON object"),
        (["http://h", "-H", "nocolon"], "Name: value"),
    ],
)
def test_cli_bad_arguments_are_named(args: list[str], message: str) -> None:
    done = _cli(*args)
    assert done.returncode == 2 and message in done.stderr
