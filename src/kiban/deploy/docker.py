"""`kiban up --docker` and `kiban down --docker`: a rendered Compose project under Docker.

Everything goes through the ``docker`` command (``docker compose`` plugin):
``up -d --build``, then ``ps`` until every service runs and passes its
healthcheck, ``down`` to stop (named volumes, the model cache among them, stay).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from kiban.errors import KibanError

INFO_TIMEOUT_S = 15.0
POLL_S = 3.0


class DockerError(KibanError):
    """Docker cannot do what was asked; the message says why and what to do."""

    exit_code = 1


@dataclass(frozen=True)
class ServiceState:
    """One service of the project as ``docker compose ps`` reports it."""

    service: str
    state: str  # running, exited, restarting, created, ...
    health: str  # healthy, unhealthy, starting, or "" without a healthcheck
    exit_code: int | None = None

    @property
    def ready(self) -> bool:
        return self.state == "running" and self.health in ("healthy", "")

    @property
    def failed(self) -> bool:
        return self.state in ("exited", "dead") or self.health == "unhealthy"


def _run(argv: list[str], timeout: float | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)


def docker_problem() -> str | None:
    """Why Docker cannot run a Compose project here (None: it can)."""
    if shutil.which("docker") is None:
        return (
            "Docker is not installed here (no `docker` command); install Docker Engine with "
            "the compose plugin and the NVIDIA Container Toolkit (docs/containers.md), or run "
            "`kiban up` without --docker"
        )
    try:
        info = _run(["docker", "info", "--format", "{{.ServerVersion}}"], INFO_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return f"the Docker daemon did not answer `docker info` in {INFO_TIMEOUT_S:g} s"
    if info.returncode != 0:
        reason = (info.stderr.strip().splitlines() or ["no output"])[-1]
        return (
            f"no Docker daemon answers here ({reason}); start Docker Engine "
            "(sudo systemctl start docker) or Docker Desktop, or run `kiban up` without --docker"
        )
    plugin = _run(["docker", "compose", "version"], INFO_TIMEOUT_S)
    if plugin.returncode != 0:
        return (
            "the docker command has no compose plugin (`docker compose version` failed); "
            "install docker-compose-plugin"
        )
    return None


def require_docker() -> None:
    problem = docker_problem()
    if problem is not None:
        raise DockerError(problem)


def _compose(compose_file: Path, project: str, *args: str) -> list[str]:
    return ["docker", "compose", "-f", str(compose_file), "-p", project, *args]


def compose_up(compose_file: Path, project: str) -> None:
    """``docker compose up -d --build``; its output goes to the terminal."""
    argv = _compose(compose_file, project, "up", "-d", "--build", "--remove-orphans")
    if subprocess.run(argv, check=False).returncode != 0:
        raise DockerError(f"`{' '.join(argv)}` failed (its output is above)")


def compose_down(compose_file: Path, project: str) -> None:
    """``docker compose down``: containers and the network go, named volumes stay."""
    argv = _compose(compose_file, project, "down")
    if subprocess.run(argv, check=False).returncode != 0:
        raise DockerError(f"`{' '.join(argv)}` failed (its output is above)")


def parse_ps(text: str) -> list[ServiceState]:
    """``docker compose ps --format json``: one JSON object a line (v2.21+) or one array."""
    text = text.strip()
    if not text:
        return []
    rows = json.loads(text) if text.startswith("[") else [json.loads(t) for t in text.splitlines()]
    return [
        ServiceState(
            service=row.get("Service", ""),
            state=row.get("State", ""),
            health=row.get("Health", "") or "",
            exit_code=row.get("ExitCode"),
        )
        for row in rows
    ]


def service_states(compose_file: Path, project: str) -> list[ServiceState]:
    result = _run(_compose(compose_file, project, "ps", "--all", "--format", "json"), 60)
    if result.returncode != 0:
        raise DockerError(f"docker compose ps failed: {result.stderr.strip()}")
    return parse_ps(result.stdout)


def wait_healthy(
    compose_file: Path,
    project: str,
    timeout_s: float,
    tick: Callable[[list[ServiceState]], None] | None = None,
) -> list[ServiceState]:
    """Poll until every service is ready; DockerError names the ones that fail or lag."""
    deadline = time.monotonic() + timeout_s
    while True:
        states = service_states(compose_file, project)
        if tick is not None:
            tick(states)
        failed = [s for s in states if s.failed]
        if failed:
            raise DockerError(_describe(compose_file, project, failed, "failed"))
        if states and all(s.ready for s in states):
            return states
        if time.monotonic() > deadline:
            late = [s for s in states if not s.ready]
            raise DockerError(
                _describe(compose_file, project, late, f"not ready in {timeout_s:g} s")
            )
        time.sleep(POLL_S)


def _describe(compose_file: Path, project: str, states: list[ServiceState], what: str) -> str:
    lines = [f"{len(states)} service(s) {what}:"]
    for state in states:
        health = f", {state.health}" if state.health else ""
        lines.append(f"  {state.service}: {state.state}{health}")
        logs = _run(_compose(compose_file, project, "logs", "--tail", "20", state.service), 60)
        lines += [f"    {line}" for line in logs.stdout.strip().splitlines()[-20:]]
    return "\n".join(lines)
