"""GPU fail-fast and on-GPU verification, against NVML's real Python module.

Where this machine has no driver the module's own error is used; GPUs come
from tests/support/fake_nvml.py (the real pynvml with its driver calls
answered as an H100 answered them on the device).
"""

from __future__ import annotations

import pytest

from kiban import gpus
from kiban.config import parse_config
from kiban.deploy import gpu_policy
from kiban.engines.telemetry import StartupReport
from tests.support.fake_nvml import FakeGpu, fake_nvml

GIB = 1024**3


def _cfg(gpu_list: list[int], memory_gib: float | None = None):
    launch = {"model": "/m", "gpus": gpu_list, "port": 9001}
    if memory_gib is not None:
        launch["gpu_memory_gib"] = memory_gib
    raw = {
        "engines": [{"name": "big", "kind": "vllm", "models": ["m"], "launch": launch}],
        "routes": [{"model": "m", "engines": ["big"]}],
    }
    return parse_config(raw, {})


@pytest.fixture
def h100(monkeypatch: pytest.MonkeyPatch) -> list[FakeGpu]:
    cards = [FakeGpu(), FakeGpu(uuid="GPU-11111111-1111-1111-1111-111111111111")]
    monkeypatch.setattr(gpus, "pynvml", fake_nvml(cards))
    gpus._init.cache_clear()
    yield cards
    gpus._init.cache_clear()


def test_no_driver_refuses_gpu_engines_and_says_how_to_run_on_cpu() -> None:
    gpus._init.cache_clear()
    cfg = _cfg([0])
    assert gpu_policy.gpu_required(cfg)
    (problem,) = gpu_policy.preflight(cfg, cfg.engines)
    assert problem.startswith("engines 'big' (GPUs 0) need an NVIDIA GPU, but NVML library")
    assert "launch.device: cpu" in problem


def test_missing_gpu_and_too_little_memory(h100: list[FakeGpu]) -> None:
    cfg = _cfg([0, 5])
    (problem,) = gpu_policy.preflight(cfg, cfg.engines)
    assert problem == (
        "engine 'big': launch.gpus names GPU 5, which does not exist; this machine has "
        "GPUs: 0 (NVIDIA H100 80GB HBM3), 1 (NVIDIA H100 80GB HBM3)"
    )
    h100[0].mem_used = 70 * GIB
    cfg = _cfg([0])
    (problem,) = gpu_policy.preflight(cfg, cfg.engines, {0: 20 * GIB})
    assert problem.startswith("GPU 0 (NVIDIA H100 80GB HBM3) has 9.6 GiB free of 79.6 GiB")
    assert "need 20.0 GiB" in problem and "kiban plan" in problem
    assert gpu_policy.preflight(cfg, cfg.engines, {0: 9 * GIB}) == []


def test_visible_devices_by_uuid(h100: list[FakeGpu]) -> None:
    env = gpus.visible_devices_env([1])
    assert env == {
        "CUDA_VISIBLE_DEVICES": "GPU-11111111-1111-1111-1111-111111111111",
        "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
    }


def test_verify_on_gpu(h100: list[FakeGpu]) -> None:
    engine = _cfg([0]).engines[0]
    cuda, cpu, silent = StartupReport(device="cuda"), StartupReport(device="cpu"), StartupReport()
    verdict = gpu_policy.verify_on_gpu(engine, {4242, 4243}, silent)
    assert verdict.on_gpu is True and verdict.detail == "PID 4242 holds 1.0 GiB on GPU 0"
    verdict = gpu_policy.verify_on_gpu(engine, {999}, silent)
    assert verdict.on_gpu is False and "fell back to the CPU" in verdict.detail
    # a CUDA context shows in NVML's list, but the engine says it runs on the CPU
    assert gpu_policy.verify_on_gpu(engine, {4242}, cpu).on_gpu is False
    # WSL2: NVML lists no processes; the engine's own report decides
    h100[0].unsupported.add("nvmlDeviceGetComputeRunningProcesses")
    assert gpu_policy.verify_on_gpu(engine, {999}, cuda).on_gpu is True
    assert gpu_policy.verify_on_gpu(engine, {999}, silent).on_gpu is None
