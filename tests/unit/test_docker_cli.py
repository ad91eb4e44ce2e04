"""`kiban up --docker` / `kiban down --docker` where Docker cannot run them, and the parsing of
`docker compose ps`: this machine has no Docker daemon, so these say so, clearly."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kiban.deploy.docker import ServiceState, parse_ps
from tests.support.deploy_configs import readme_configs, write_config


def _kiban(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kiban.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )


@pytest.fixture
def config(tmp_path) -> Path:
    return write_config(tmp_path, readme_configs()[0])


def _path_without_docker(tmp_path: Path) -> str:
    """PATH with only python: no `docker` command anywhere on it."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").symlink_to(sys.executable)
    return str(bin_dir)


@pytest.mark.parametrize("command", ["up", "down"])
def test_without_docker_installed(tmp_path, config, command):
    env = {**os.environ, "PATH": _path_without_docker(tmp_path)}
    result = _kiban([command, "--docker", "-c", str(config)], env)
    assert result.returncode == 1
    assert f"kiban {command} --docker: Docker is not installed here (no `docker` command)" in (
        result.stderr
    )
    assert not (config.parent / ".kiban").exists()  # nothing rendered, nothing started


@pytest.mark.parametrize("command", ["up", "down"])
def test_without_a_docker_daemon(tmp_path, config, command):
    if shutil.which("docker") is None:
        pytest.skip("no docker CLI on this machine (covered by test_without_docker_installed)")
    # a socket nobody listens on: the state of a machine with the CLI but no daemon
    env = {**os.environ, "DOCKER_HOST": f"unix://{tmp_path}/no-daemon.sock"}
    result = _kiban([command, "--docker", "-c", str(config)], env)
    assert result.returncode == 1
    assert f"kiban {command} --docker: no Docker daemon answers here" in result.stderr
    assert "start Docker Engine" in result.stderr


def test_compose_ps_json_lines_and_array():
    """`docker compose ps --format json`: one object a line since v2.21, an array before."""
    lines = (
        '{"Service":"gateway","State":"running","Health":"healthy","ExitCode":0}\n'
        '{"Service":"qwen","State":"running","Health":"starting","ExitCode":0}\n'
        '{"Service":"prometheus","State":"running","Health":"","ExitCode":0}\n'
        '{"Service":"llama","State":"exited","Health":"","ExitCode":1}'
    )
    states = parse_ps(lines)
    assert states == parse_ps("[" + lines.replace("\n", ",") + "]")
    assert [s.ready for s in states] == [True, False, True, False]
    assert [s.failed for s in states] == [False, False, False, True]
    assert ServiceState("x", "running", "unhealthy").failed
    assert parse_ps("") == []
