"""The gateway's metrics: names Prometheus accepts, what one request records, one view
across worker processes."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

from prometheus_client.parser import text_string_to_metric_families

from kiban.config import parse_config
from kiban.gateway.metrics import Metrics
from kiban.gateway.proxy import Exchange
from kiban.gateway.routing import Router
from tests.support.promtool import promtool

CONFIG = {
    "engines": [
        {"name": "a", "kind": "vllm", "url": "http://127.0.0.1:1", "models": ["m"]},
        {"name": "b", "kind": "vllm", "url": "http://127.0.0.1:2", "models": ["m"]},
    ],
    "routes": [{"model": "m", "engines": ["a", "b"]}],
}


def _exchange(**fields) -> Exchange:
    ex = Exchange(
        request_id="r",
        endpoint="chat",
        body=b"{}",
        payload={},
        model="m",
        stream=False,
        client_headers=[],
    )
    for key, value in fields.items():
        setattr(ex, key, value)
    return ex


def _values(metrics: Metrics) -> dict[tuple[str, tuple], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(metrics.render().decode())
        for s in family.samples
    }


def test_every_metric_passes_promtool_check_metrics() -> None:
    m = Metrics()
    router = Router(parse_config(CONFIG))
    m.prepare(router.routes)
    usage = {"prompt_tokens": 3, "completion_tokens": 5}
    m.observe_exchange(
        "m",
        _exchange(
            engine="a", status=200, usage=usage, ttft_s=0.1, itl_s=0.01, chunks=6, stream=True
        ),
        0.5,
    )
    m.observe_exchange("m", _exchange(engine="b", status=200, attempts=2), 0.2)
    m.retried("m", "status")
    m.engine_failures.labels("m", "a", "connect").inc()
    for upstream in router.engines.values():
        m.engine_health(upstream)
    m.routes_health(router.routes)
    m.set_gpu_verified("a", True)
    m.auth_rejections.inc()
    m.rate_limited("m", "engine_concurrency")
    m.structured_outcome("m", "valid")
    m.structured_result("m", "validated")
    result = promtool("check", "metrics", stdin=m.render())
    assert result.returncode == 0, result.stdout + result.stderr
    text = m.render().decode()
    for name in (
        "kiban_requests_total",
        "kiban_request_duration_seconds_bucket",
        "kiban_time_to_first_token_seconds_bucket",
        "kiban_inter_token_latency_seconds_bucket",
        "kiban_tokens_total",
        "kiban_in_flight_requests",
        "kiban_retries_total",
        "kiban_failovers_total",
        "kiban_upstream_failures_total",
        "kiban_engine_up",
        "kiban_engine_circuit_state",
        "kiban_route_healthy_engines",
        "kiban_engine_gpu_verified",
        "kiban_auth_rejections_total",
        "kiban_rate_limit_rejections_total",
        "kiban_structured_outcomes_total",
        "kiban_structured_requests_total",
        "kiban_stream_chunks_total",
    ):
        assert f"\n{name}" in text, name


def test_one_request_records_status_latencies_tokens_and_failover() -> None:
    m = Metrics()
    usage = {"prompt_tokens": 31, "completion_tokens": 128}
    m.observe_exchange(
        "m",
        _exchange(
            engine="a", status=200, usage=usage, ttft_s=0.04, itl_s=0.006, chunks=130, attempts=2
        ),
        1.5,
    )
    m.observe_exchange("m", _exchange(status=503), 0.001)  # no engine reached
    v = _values(m)
    assert v[("kiban_requests_total", (("engine", "a"), ("route", "m"), ("status", "200")))] == 1
    assert v[("kiban_requests_total", (("engine", "none"), ("route", "m"), ("status", "503")))] == 1
    tokens = ("kiban_tokens_total", (("engine", "a"), ("route", "m"), ("type", "completion")))
    assert v[tokens] == 128
    assert v[("kiban_tokens_total", (("engine", "a"), ("route", "m"), ("type", "prompt")))] == 31
    assert v[("kiban_stream_chunks_total", (("engine", "a"), ("route", "m")))] == 130
    assert v[("kiban_failovers_total", (("engine", "a"), ("route", "m")))] == 1
    assert v[("kiban_request_duration_seconds_sum", (("engine", "a"), ("route", "m")))] == 1.5
    itl = (
        "kiban_inter_token_latency_seconds_bucket",
        (("engine", "a"), ("le", "0.01"), ("route", "m")),
    )
    assert v[itl] == 1
    assert v[("kiban_time_to_first_token_seconds_count", (("engine", "a"), ("route", "m")))] == 1
    # a non-streamed request has no TTFT; the cached children are the same objects
    assert m.series("m", "a") is m.series("m", "a")
    assert ("kiban_time_to_first_token_seconds_count", (("engine", "none"), ("route", "m"))) in v
    assert v[("kiban_time_to_first_token_seconds_count", (("engine", "none"), ("route", "m")))] == 0


WORKER = textwrap.dedent(
    """
    import sys
    from kiban.gateway.metrics import Metrics
    from kiban.gateway.proxy import Exchange
    m = Metrics()
    n = int(sys.argv[1])
    for _ in range(n):
        ex = Exchange(request_id="r", endpoint="chat", body=b"", payload={}, model="m",
                      stream=False, client_headers=[])
        ex.engine, ex.status = "a", 200
        ex.usage = {"prompt_tokens": 2, "completion_tokens": 3}
        m.observe_exchange("m", ex, 0.1)
    m.in_flight_for("m").inc()
    if sys.argv[2] == "exit":
        m.close()  # what the gateway does at shutdown
    print(m.render().decode())
    """
)


def test_workers_report_one_view(tmp_path) -> None:
    """Two worker processes record; whichever renders shows the sum of both."""
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    outputs = [
        subprocess.run(
            [sys.executable, "-c", WORKER, str(n), how],
            env=env,
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        for n, how in ((3, "exit"), (4, "stay"))
    ]
    values = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(outputs[-1])
        for s in family.samples
    }
    assert (
        values[("kiban_requests_total", (("engine", "a"), ("route", "m"), ("status", "200")))] == 7
    )
    tokens = ("kiban_tokens_total", (("engine", "a"), ("route", "m"), ("type", "completion")))
    assert values[tokens] == 21
    # in-flight is a live sum: the worker that shut down no longer counts
    assert values[("kiban_in_flight_requests", (("route", "m"),))] == 1
