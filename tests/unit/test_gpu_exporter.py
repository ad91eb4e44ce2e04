"""The NVML GPU collector: real (no driver here) and against the real pynvml with its driver
calls answered by tests/support/fake_nvml.py (what cannot run on this machine)."""

from __future__ import annotations

import inspect
import sys
import time
import urllib.request
from pathlib import Path

import pynvml
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from kiban.observability.gpu import READINGS, GpuCollector
from tests.support.engines import EngineProcess, free_port
from tests.support.fake_nvml import REPLACED, FakeGpu, fake_nvml
from tests.support.promtool import promtool


def _samples(collector: GpuCollector) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    registry = CollectorRegistry()
    registry.register(collector)
    text = generate_latest(registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _value(samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def test_fake_replaces_only_real_pynvml_functions_with_compatible_signatures() -> None:
    fake = fake_nvml([FakeGpu()])
    for name in REPLACED:
        real = getattr(pynvml, name)
        assert callable(real), name
        real_params = [
            p for p in inspect.signature(real).parameters.values() if p.default is p.empty
        ]
        fake_params = inspect.signature(getattr(fake, name)).parameters
        assert len(fake_params) >= len(real_params), name
    # everything the collector may call on the module is either replaced or a real constant
    assert fake.NVMLError is pynvml.NVMLError


def test_no_driver_here_is_reported_plainly() -> None:
    collector = GpuCollector()
    assert not collector.available
    assert "no NVIDIA GPU driver" in collector.describe_state()
    samples = _samples(collector)
    assert samples == {("kiban_gpu_nvml_available", ()): 0.0}


def test_h100_readings_in_base_units() -> None:
    gpu = FakeGpu(
        clock_events=pynvml.nvmlClocksEventReasonSwPowerCap
        | pynvml.nvmlClocksEventReasonHwThermalSlowdown,
        ecc_corrected=3,
    )
    collector = GpuCollector(fake_nvml([gpu]), watch_xid=False)
    s = _samples(collector)
    assert _value(s, "kiban_gpu_nvml_available") == 1
    assert _value(s, "kiban_gpu_utilization_ratio", gpu="0") == pytest.approx(0.37)
    assert _value(s, "kiban_gpu_memory_utilization_ratio", gpu="0") == pytest.approx(0.12)
    assert _value(s, "kiban_gpu_memory_used_bytes", gpu="0") == gpu.mem_used
    assert _value(s, "kiban_gpu_memory_total_bytes", gpu="0") == gpu.mem_total
    assert _value(s, "kiban_gpu_memory_reserved_bytes", gpu="0") == gpu.mem_reserved
    assert _value(s, "kiban_gpu_temperature_celsius", gpu="0") == 41
    assert _value(s, "kiban_gpu_temperature_slowdown_celsius", gpu="0") == 87
    assert _value(s, "kiban_gpu_power_watts", gpu="0") == pytest.approx(118.532)
    assert _value(s, "kiban_gpu_power_limit_watts", gpu="0") == 700
    assert _value(s, "kiban_gpu_energy_joules_total", gpu="0") == pytest.approx(9_876_543.21)
    assert _value(s, "kiban_gpu_sm_clock_hertz", gpu="0") == 1980e6
    assert _value(s, "kiban_gpu_memory_clock_hertz", gpu="0") == 2619e6
    assert _value(s, "kiban_gpu_clock_event_active", gpu="0", reason="sw_power_cap") == 1
    assert _value(s, "kiban_gpu_clock_event_active", gpu="0", reason="hw_thermal_slowdown") == 1
    assert _value(s, "kiban_gpu_clock_event_active", gpu="0", reason="gpu_idle") == 0
    assert _value(s, "kiban_gpu_ecc_errors_total", gpu="0", type="corrected") == 3
    assert _value(s, "kiban_gpu_ecc_errors_total", gpu="0", type="uncorrected") == 0
    tx = _value(s, "kiban_gpu_pcie_throughput_bytes_per_second", gpu="0", direction="tx")
    assert tx == 1500 * 1024
    assert _value(s, "kiban_gpu_performance_state", gpu="0") == 0
    assert _value(s, "kiban_gpu_fan_speed_ratio", gpu="0") == pytest.approx(0.3)
    assert _value(s, "kiban_gpu_processes", gpu="0") == 1
    key = ("kiban_gpu_process_memory_used_bytes", (("command", ""), ("gpu", "0"), ("pid", "4242")))
    assert s[key] == 1024 * 1024 * 1024
    info = [k for k in s if k[0] == "kiban_gpu_info"]
    assert dict(info[0][1])["name"] == "NVIDIA H100 80GB HBM3"
    for metric in READINGS:
        assert _value(s, "kiban_gpu_metric_supported", gpu="0", metric=metric) == 1


def test_unsupported_readings_are_absent_and_flagged_never_zero() -> None:
    wsl = FakeGpu(
        unsupported={
            "nvmlDeviceGetFanSpeed",
            "nvmlDeviceGetTotalEccErrors",
            "nvmlDeviceGetPcieThroughput",
            "nvmlDeviceGetTotalEnergyConsumption",
            "nvmlDeviceRegisterEvents",
            "nvmlDeviceGetMemoryInfo_v2",
        },
        processes=[(101, None), (102, None)],  # WDDM / WSL2: processes without their memory
    )
    collector = GpuCollector(fake_nvml([wsl]), watch_xid=True)
    try:
        s = _samples(collector)
        names = {name for name, _ in s}
        for absent in (
            "kiban_gpu_fan_speed_ratio",
            "kiban_gpu_ecc_errors_total",
            "kiban_gpu_pcie_throughput_bytes_per_second",
            "kiban_gpu_energy_joules_total",
            "kiban_gpu_process_memory_used_bytes",
            "kiban_gpu_xid_errors_total",
            "kiban_gpu_memory_reserved_bytes",
        ):
            assert absent not in names, absent
        for metric in ("fan_speed", "ecc_errors", "pcie_throughput", "energy", "process_memory"):
            assert _value(s, "kiban_gpu_metric_supported", gpu="0", metric=metric) == 0
        assert _value(s, "kiban_gpu_metric_supported", gpu="0", metric="xid_errors") == 0
        # memory falls back to the v1 query and is still read
        assert _value(s, "kiban_gpu_memory_used_bytes", gpu="0") == wsl.mem_used
        assert _value(s, "kiban_gpu_metric_supported", gpu="0", metric="memory") == 1
        assert _value(s, "kiban_gpu_processes", gpu="0") == 2
        # once NVML said NotSupported, later scrapes keep saying so without asking again
        wsl.unsupported.discard("nvmlDeviceGetFanSpeed")
        again = _samples(collector)
        assert _value(again, "kiban_gpu_metric_supported", gpu="0", metric="fan_speed") == 0
    finally:
        collector.close()


def test_xid_events_are_counted_by_gpu_and_code() -> None:
    gpus = [FakeGpu(), FakeGpu(uuid="GPU-1", xid_events=[79, 79, 13])]
    collector = GpuCollector(fake_nvml(gpus), watch_xid=True)
    try:
        deadline = time.monotonic() + 10
        while gpus[1].xid_events and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.05)
        s = _samples(collector)
        assert _value(s, "kiban_gpu_xid_errors_total", gpu="1", xid="79") == 2
        assert _value(s, "kiban_gpu_xid_errors_total", gpu="1", xid="13") == 1
        assert ("kiban_gpu_xid_errors_total", (("gpu", "0"), ("xid", "79"))) not in s
        assert _value(s, "kiban_gpu_metric_supported", gpu="0", metric="xid_errors") == 1
    finally:
        collector.close()


def test_exposition_passes_promtool_check_metrics() -> None:
    gpus = [FakeGpu(), FakeGpu(uuid="GPU-1", unsupported={"nvmlDeviceGetFanSpeed"})]
    collector = GpuCollector(fake_nvml(gpus), watch_xid=False)
    registry = CollectorRegistry()
    registry.register(collector)
    result = promtool("check", "metrics", stdin=generate_latest(registry))
    assert result.returncode == 0, result.stdout + result.stderr


def test_standalone_exporter_serves_without_a_driver(tmp_path) -> None:
    port = free_port()
    exporter = EngineProcess(
        name="kiban gpu-exporter",
        argv=[str(Path(sys.executable).parent / "kiban"), "gpu-exporter", "--port", str(port)],
        port=port,
        log_path=tmp_path / "gpu-exporter.log",
        health_path="/metrics",
    )
    exporter.start(timeout=60)
    try:
        with urllib.request.urlopen(f"{exporter.base_url}/metrics", timeout=5) as resp:
            body = resp.read().decode()
        assert "kiban_gpu_nvml_available 0.0" in body
    finally:
        code = exporter.stop()
    assert code == 0
    assert "no NVIDIA GPU driver on this machine" in exporter.log_tail()
