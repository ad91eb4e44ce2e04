"""`kiban doctor`: what this machine offers kiban, and what to do about each problem.

Each check returns :class:`Finding`\\ s; none of them changes anything. A
finding's ``fix`` says what to do when it is not ``ok``.
"""

from __future__ import annotations

import functools
import json
import platform
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kiban import __version__
from kiban import gpus as nvml
from kiban.config import KibanConfig
from kiban.deploy.envs import ENGINE_ENVS, env_root, marker_state
from kiban.deploy.findings import Finding, Status  # noqa: F401  (Status: part of the API)
from kiban.deploy.wsl import read_facts
from kiban.deploy.wsl import wsl_findings as wsl_setup_findings
from kiban.engines import ENGINE_KINDS

WSL_LIMITS = (
    "WSL2: NVML lists no per-process GPU memory, so kiban checks an engine's device from its "
    "own start-up log; pinned memory is limited (vLLM warns and runs slower); GPU memory is "
    "shared with Windows, so leave headroom for the desktop"
)


Check = Callable[[], list[Finding]]


def python_findings() -> list[Finding]:
    version = platform.python_version()
    ok = sys.version_info >= (3, 11)
    return [
        Finding(
            "python",
            "ok" if ok else "fail",
            f"Python {version} ({sys.executable})",
            "" if ok else "kiban needs Python 3.11 or newer",
        ),
        Finding("kiban", "info", f"kiban {__version__} on {platform.platform()}"),
    ]


def wsl_findings() -> list[Finding]:
    """Under WSL2: its limits, the GPU path from Windows, which Docker serves it, its memory."""
    if not nvml.is_wsl():
        return []
    info = docker_info()
    docker = None if info == _NO_DOCKER else info
    return [
        Finding("wsl", "warn", "running under WSL2", WSL_LIMITS),
        *wsl_setup_findings(read_facts(), docker),
    ]


def gpu_findings() -> list[Finding]:
    try:
        driver = nvml.driver_version()
        found = nvml.inventory()
    except nvml.GpuUnavailable as err:
        return [
            Finding(
                "gpu",
                "warn",
                f"no usable NVIDIA GPU: {err}",
                "engines can still run with launch.device: cpu",
            )
        ]
    findings = [Finding("driver", "ok", f"NVIDIA driver {driver}, NVML answers")]
    if not found:
        findings.append(
            Finding(
                "gpu",
                "fail",
                "the driver answers but lists no GPU",
                "check nvidia-smi and the GPU's power/PCIe state",
            )
        )
    for gpu in found:
        major, minor = gpu.compute_capability
        findings.append(
            Finding(
                f"gpu {gpu.index}",
                "ok",
                f"{gpu.name}, {nvml.mib(gpu.memory_free)} free of {nvml.mib(gpu.memory_total)}, "
                f"compute capability {major}.{minor}"
                + ("" if (major, minor) >= (8, 9) else "; fp8 KV cache needs 8.9 (Ada) or newer"),
            )
        )
        procs = nvml.processes(gpu.index)
        detail = (
            "per-process memory: not reported by this platform"
            if procs is None
            else f"{len(procs)} compute processes"
        )
        findings.append(Finding(f"gpu {gpu.index}", "info", detail))
    env = {k: v for k, v in nvml.environment_summary().items() if v is not None}
    if env:
        findings.append(
            Finding(
                "cuda",
                "warn",
                "set in this shell: " + ", ".join(f"{k}={v}" for k, v in env.items()),
                "kiban sets CUDA_VISIBLE_DEVICES per engine from launch.gpus; a value here "
                "only affects commands you start yourself",
            )
        )
    return findings


_NO_DOCKER = "no docker command"


@functools.cache
def docker_info() -> dict[str, Any] | str:
    """``docker info`` as a mapping, or why it did not answer (``_NO_DOCKER``: no CLI)."""
    if shutil.which("docker") is None:
        return _NO_DOCKER
    try:
        result = subprocess.run(
            ["docker", "info", "--format", "{{json .}}"], capture_output=True, text=True, timeout=15
        )
    except subprocess.TimeoutExpired:
        return "docker info did not answer in 15 s"
    if result.returncode != 0:
        return (result.stderr.strip().splitlines() or ["no output"])[-1]
    info: dict[str, Any] = json.loads(result.stdout)
    # the CLI prints the daemon's error inside the JSON when the daemon does not answer
    if not info.get("ServerVersion") and info.get("ServerErrors"):
        return "; ".join(info["ServerErrors"])
    return info


def docker_findings() -> list[Finding]:
    info = docker_info()
    if info == _NO_DOCKER:
        return [
            Finding(
                "docker",
                "info",
                "docker CLI not installed",
                "only needed for containers; kiban up runs engines from virtual "
                "environments without it",
            )
        ]
    if isinstance(info, str):
        reason = info
        return [
            Finding(
                "docker",
                "warn",
                f"docker CLI present, daemon unreachable: {reason}",
                "start Docker Engine (sudo systemctl start docker) or Docker Desktop "
                "(with WSL integration enabled for this distribution)",
            )
        ]
    runtimes = sorted((info.get("Runtimes") or {}).keys())
    findings = [
        Finding(
            "docker",
            "ok",
            f"Docker {info.get('ServerVersion', '?')} on {info.get('OperatingSystem', '?')}",
        )
    ]
    nvidia = "nvidia" in runtimes or bool(info.get("CDISpecDirs"))
    findings.append(
        Finding(
            "nvidia runtime",
            "ok" if nvidia else "warn",
            f"runtimes: {', '.join(runtimes) or 'none'}",
            ""
            if nvidia
            else "install the NVIDIA Container Toolkit and run "
            "`sudo nvidia-ctk runtime configure --runtime=docker` (Docker Desktop on WSL2 ships "
            "GPU support: enable it in Settings > Resources > WSL integration)",
        )
    )
    return findings


def config_findings(cfg: KibanConfig) -> list[Finding]:
    findings: list[Finding] = []
    for engine in cfg.engines:
        if engine.launch is None:
            continue
        launch = engine.launch
        local = launch.model.startswith("/")
        if local and not Path(launch.model).exists():
            findings.append(
                Finding(
                    f"engine {engine.name}",
                    "fail",
                    f"launch.model {launch.model} does not exist",
                    "fix the path (relative paths start with ./)",
                )
            )
        try:
            env_name = ENGINE_KINDS[engine.kind].launch().environment(launch.device)
        except Exception as err:  # LaunchUnsupported
            findings.append(Finding(f"engine {engine.name}", "fail", str(err)))
            continue
        if env_name is not None and env_name in ENGINE_ENVS:
            state = marker_state(env_root(env_name), ENGINE_ENVS[env_name])
            built = state == "current"
            findings.append(
                Finding(
                    f"engine {engine.name}",
                    "ok" if built else "info",
                    f"environment {env_name}: {'built' if built else state}",
                    "" if built else "kiban up builds it (minutes, once)",
                )
            )
        findings.append(_port_finding(f"engine {engine.name}", engine.port))
    findings.append(_port_finding("gateway", cfg.gateway.port))
    return findings


def _port_finding(area: str, port: int) -> Finding:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        free = sock.connect_ex(("127.0.0.1", port)) != 0
    if free:
        return Finding(area, "ok", f"port {port} is free")
    return Finding(
        area,
        "warn",
        f"port {port} is in use",
        "kiban up refuses to start there; if kiban already runs this "
        "configuration, see kiban status",
    )


def run_checks(cfg: KibanConfig | None) -> list[Finding]:
    """Every check, in the order a user reads them."""
    checks: list[Check] = [python_findings, wsl_findings, gpu_findings, docker_findings]
    findings = [f for check in checks for f in check()]
    if cfg is not None:
        findings += config_findings(cfg)
    return findings
