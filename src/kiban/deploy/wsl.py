"""WSL2 for `kiban doctor`: the GPU's way into the distribution, and which Docker serves it.

Facts this module checks for (NVIDIA's *CUDA on WSL User Guide*; Docker's WSL 2 and GPU
documentation):

- the Windows NVIDIA driver exposes the GPU to WSL2 through ``/dev/dxg`` and maps its
  user-mode libraries (libcuda, libnvidia-ml, nvidia-smi) into ``/usr/lib/wsl/lib``; a
  Linux NVIDIA driver installed inside the distribution shadows them and breaks CUDA
  (the guide: install no Linux display driver in WSL);
- Docker Desktop (WSL 2 backend) serves the distribution's ``docker`` when its WSL
  integration is on for it, with GPU support built in; its ``docker info`` reports the
  operating system ``Docker Desktop``;
- Docker Engine installed in the distribution itself needs the NVIDIA Container Toolkit
  (``nvidia-ctk runtime configure --runtime=docker``) and something to start dockerd:
  systemd (``[boot] systemd=true`` in /etc/wsl.conf) or ``sudo service docker start``;
- the WSL2 VM gets a share of Windows' memory (``memory=`` in ``.wslconfig``).

Everything is read below a root folder, so the checks run against a prepared tree in tests.
"""

from __future__ import annotations

import configparser
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kiban.deploy.findings import Finding

GiB = 1024**3
#: where the loader finds a distribution's own copies of the driver libraries
_LIB_DIRS = ("usr/lib/x86_64-linux-gnu", "usr/lib64", "lib/x86_64-linux-gnu", "usr/local/lib")
_DRIVER_LIBS = ("libcuda.so.1", "libnvidia-ml.so.1")
_DESKTOP_ON_WINDOWS = "mnt/c/Program Files/Docker/Docker"


@dataclass(frozen=True)
class WslFacts:
    """What the distribution shows about its GPU path, Docker and memory."""

    dxg: bool
    wsl_libs: bool
    shadowing_libs: list[str] = field(default_factory=list)
    systemd: bool = False
    desktop_on_windows: bool = False
    nvidia_ctk: bool = False
    memory_bytes: int | None = None


def read_facts(
    root: Path = Path("/"), which: Callable[[str], str | None] = shutil.which
) -> WslFacts:
    shadowing = []
    for directory in _LIB_DIRS:
        for lib in _DRIVER_LIBS:
            path = root / directory / lib
            if path.exists() and "/usr/lib/wsl/" not in str(path.resolve()):
                shadowing.append(f"/{directory}/{lib}")
    return WslFacts(
        dxg=(root / "dev" / "dxg").exists(),
        wsl_libs=(root / "usr/lib/wsl/lib/libcuda.so.1").exists(),
        shadowing_libs=shadowing,
        systemd=_systemd_on(root / "etc" / "wsl.conf"),
        desktop_on_windows=(root / _DESKTOP_ON_WINDOWS).is_dir(),
        nvidia_ctk=which("nvidia-ctk") is not None,
        memory_bytes=_mem_total(root / "proc" / "meminfo"),
    )


def _systemd_on(wsl_conf: Path) -> bool:
    parser = configparser.ConfigParser()
    try:
        parser.read_string(wsl_conf.read_text())
    except (OSError, configparser.Error):
        return False
    return parser.get("boot", "systemd", fallback="false").strip().lower() == "true"


def _mem_total(meminfo: Path) -> int | None:
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def gpu_findings(facts: WslFacts) -> list[Finding]:
    """The GPU path from the Windows driver into the distribution."""
    driver_fix = (
        "install the current NVIDIA driver on Windows (it carries WSL support), run "
        "`wsl --update` and then `wsl --shutdown` in Windows"
    )
    if not facts.dxg:
        return [
            Finding("wsl gpu", "fail", "no /dev/dxg: Windows exposes no GPU to WSL2", driver_fix)
        ]
    findings = []
    if not facts.wsl_libs:
        findings.append(
            Finding(
                "wsl gpu",
                "fail",
                "/dev/dxg is there, but not the Windows driver's CUDA library "
                "(/usr/lib/wsl/lib/libcuda.so.1)",
                driver_fix,
            )
        )
    else:
        findings.append(
            Finding(
                "wsl gpu",
                "ok",
                "GPU paravirtualization: /dev/dxg and the Windows driver's libraries in "
                "/usr/lib/wsl/lib",
            )
        )
    if facts.shadowing_libs:
        findings.append(
            Finding(
                "wsl gpu",
                "fail",
                "a Linux NVIDIA driver is installed in this distribution ("
                + ", ".join(facts.shadowing_libs)
                + "); its libraries shadow the Windows driver's",
                "remove it (e.g. sudo apt-get purge 'nvidia-driver-*' 'libnvidia-compute-*'): "
                "in WSL only the Windows driver may provide CUDA; install CUDA toolkits without "
                "the driver (the wsl-ubuntu packages)",
            )
        )
    return findings


def docker_findings(facts: WslFacts, docker: dict[str, Any] | str | None) -> list[Finding]:
    """Which Docker serves this distribution, and what it lacks for GPUs.

    *docker*: ``docker info`` as a mapping, a reason it did not answer, or None when the
    ``docker`` command is missing.
    """
    if isinstance(docker, dict):
        if docker.get("OperatingSystem") == "Docker Desktop":
            return [
                Finding(
                    "wsl docker",
                    "ok",
                    "Docker Desktop (WSL 2 backend) serves this distribution; it brings GPU "
                    "support (--gpus, Compose GPU reservations)",
                )
            ]
        if not facts.nvidia_ctk:
            return [
                Finding(
                    "wsl docker",
                    "warn",
                    "Docker Engine runs in this distribution without the NVIDIA Container "
                    "Toolkit (no nvidia-ctk)",
                    "install nvidia-container-toolkit, then `sudo nvidia-ctk runtime configure "
                    "--runtime=docker` and restart dockerd (docs/containers.md)",
                )
            ]
        return [
            Finding(
                "wsl docker",
                "ok",
                "Docker Engine runs in this distribution, with the NVIDIA Container Toolkit",
            )
        ]
    if docker is None:
        if facts.desktop_on_windows:
            return [
                Finding(
                    "wsl docker",
                    "warn",
                    "Docker Desktop is installed on Windows but gives this distribution no "
                    "`docker` command",
                    "Docker Desktop > Settings > Resources > WSL integration: turn it on for "
                    "this distribution",
                )
            ]
        return [
            Finding(
                "wsl docker",
                "info",
                "no Docker in this distribution (needed only for kiban up --docker)",
                "install Docker Desktop with the WSL 2 backend, or Docker Engine with the "
                "NVIDIA Container Toolkit in this distribution (docs/containers.md)",
            )
        ]
    if facts.desktop_on_windows:
        fix = (
            "start Docker Desktop, and check Settings > Resources > WSL integration for this "
            "distribution"
        )
    elif not facts.systemd:
        fix = (
            "systemd is off in this distribution, so nothing starts dockerd: add `[boot]` "
            "`systemd=true` to /etc/wsl.conf and run `wsl --shutdown`, or start it with "
            "`sudo service docker start`"
        )
    else:
        fix = "start it: sudo systemctl start docker"
    return [Finding("wsl docker", "warn", f"the docker command finds no daemon: {docker}", fix)]


def memory_findings(facts: WslFacts) -> list[Finding]:
    if facts.memory_bytes is None:
        return []
    return [
        Finding(
            "wsl memory",
            "info",
            f"the WSL2 VM has {facts.memory_bytes / GiB:.1f} GiB (by default half of Windows' "
            "memory); CPU engines, pinned memory and model loading take from it",
            "raise it with memory=<size> under [wsl2] in %UserProfile%\\.wslconfig, then "
            "`wsl --shutdown`",
        )
    ]


def wsl_findings(facts: WslFacts, docker: dict[str, Any] | str | None) -> list[Finding]:
    return [*gpu_findings(facts), *docker_findings(facts, docker), *memory_findings(facts)]
