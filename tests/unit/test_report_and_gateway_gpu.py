"""`kiban report` pieces that need no Prometheus, and GPU metrics on the gateway's /metrics."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from kiban.config import parse_config
from kiban.gateway.app import Gateway
from kiban.gateway.server import add_gpu_collector
from kiban.observability.report import (
    EngineFigures,
    GpuFigures,
    Prometheus,
    ReportError,
    conclude,
    parse_period,
)
from tests.support.engines import free_port
from tests.support.fake_nvml import FakeGpu, fake_nvml

CONFIG = {
    "engines": [{"name": "a", "kind": "vllm", "url": "http://127.0.0.1:1", "models": ["m"]}],
    "routes": [{"model": "m", "engines": ["a"]}],
}


def test_periods() -> None:
    assert parse_period("1d") == 86400
    assert parse_period("7d") == parse_period("1w") == 604800
    assert parse_period("90m") == 5400
    for bad in ("", "1y", "d", "30s"):
        with pytest.raises(ValueError, match="period"):
            parse_period(bad)


def test_conclusions_name_the_gpu_and_the_remedy() -> None:
    busy = GpuFigures(
        "0",
        engines=[
            EngineFigures(
                "vllm-a",
                "0",
                kv_saturated_share=0.18,
                kv_usage_peak=1.0,
                queued_share=0.25,
                queue_peak=12,
                requests=1000,
                errors=30,
            )
        ],
        vram_high_share=0.5,
    )
    notes = conclude(busy)
    assert notes[0] == (
        "GPU 0 ran out of KV cache 18% of the time (vllm-a): add a GPU or use int8 KV."
    )
    assert any("more than 90% of its memory in use 50% of the time" in n for n in notes)
    assert any("queued inside vllm-a 25% of the time (up to 12 waiting)" in n for n in notes)
    assert any("30 of 1000 requests to vllm-a failed" in n for n in notes)

    calm = GpuFigures(
        "1",
        engines=[
            EngineFigures("b", "1", kv_saturated_share=0.0, kv_usage_peak=0.42, queued_share=0.0)
        ],
    )
    assert conclude(calm) == [
        "GPU 1 has headroom: KV cache peaked at 42%, no lasting queue, no errors worth noting."
    ]
    assert conclude(GpuFigures("2")) == ["GPU 2: no data in this period."]


def test_unreachable_prometheus_is_a_clear_error() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(ReportError, match=f"cannot reach Prometheus at {url}"):
        Prometheus(url, timeout_s=2).query("up", 0)


def test_gateway_exports_gpu_metrics_when_nvml_answers() -> None:
    app = Gateway(parse_config(CONFIG), keys=[])
    assert add_gpu_collector(app, watch_xid=False, nvml=fake_nvml([FakeGpu()]))
    text = app.metrics.render().decode()
    assert 'kiban_gpu_memory_used_bytes{gpu="0"}' in text
    assert 'kiban_requests_total{engine="a",route="m",status="200"} 0.0' in text


MULTIPROCESS = """
from kiban.config import parse_config
from kiban.gateway.app import Gateway
from kiban.gateway.server import add_gpu_collector
from tests.support.fake_nvml import FakeGpu, fake_nvml
app = Gateway(parse_config(%r), keys=[])
assert add_gpu_collector(app, watch_xid=False, nvml=fake_nvml([FakeGpu()]))
print(app.metrics.render().decode())
"""


def test_workers_export_gpu_metrics_beside_the_multiprocess_ones(tmp_path) -> None:
    """prometheus_client picks multiprocess mode at import: a fresh interpreter, as a worker."""
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    text = subprocess.run(
        [sys.executable, "-c", MULTIPROCESS % (CONFIG,)],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    assert 'kiban_gpu_memory_used_bytes{gpu="0"}' in text
    assert 'kiban_requests_total{engine="a",route="m",status="200"} 0.0' in text
    assert list(tmp_path.glob("counter_*.db"))  # the values went through the mmap files


def test_gateway_without_nvml_adds_nothing() -> None:
    app = Gateway(parse_config(CONFIG), keys=[])
    assert not add_gpu_collector(app, watch_xid=False)  # no driver on this machine
    assert "kiban_gpu_" not in app.metrics.render().decode()
