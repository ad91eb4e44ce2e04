"""The gateway image, built from the repository's Dockerfile with buildah and run here: the
gateway answers from it as an unprivileged user, its HEALTHCHECK tells a live gateway from a
dead one, and `kiban gpu-exporter` serves from the same image."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.images import base_image, buildah, tool
from tests.support.reaper import REAPER

pytestmark = pytest.mark.image

ROOT = Path(__file__).resolve().parents[2]
TAG = "localhost/kiban-gateway:test"


@pytest.fixture(scope="module")
def image() -> Iterator[dict]:
    """Build the image; yields its Docker-format configuration."""
    base = base_image()
    before = set(_dangling())
    buildah(
        "bud",
        "--format",
        "docker",
        "--isolation",
        "chroot",
        "--network",
        "host",
        "--build-arg",
        f"PYTHON_IMAGE={base}",
        "-t",
        TAG,
        str(ROOT),
        timeout=900,
    )
    config = json.loads(buildah("inspect", "--type", "image", TAG).stdout)["Docker"]["config"]
    yield config
    buildah("rmi", TAG, timeout=120)
    # the build stage's image, left untagged by this build
    for image_id in set(_dangling()) - before:
        buildah("rmi", image_id, timeout=120)


def _dangling() -> list[str]:
    return buildah("images", "-q", "--filter", "dangling=true", timeout=60).stdout.split()


@pytest.fixture
def container(image) -> Iterator[str]:
    name = buildah("from", TAG, timeout=120).stdout.strip()
    yield name
    buildah("rm", name, timeout=120)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run(
    container: str,
    *argv: str,
    volumes: tuple[str, ...] = (),
    env: dict | None = None,
    background: bool = False,
):
    args = [tool("buildah"), "run", "--isolation", "chroot", "--network", "host"]
    for volume in volumes:
        args += ["-v", volume]
    for key, value in (env or {}).items():
        args += ["--env", f"{key}={value}"]
    args += [container, "--", *argv]
    if background:
        process = subprocess.Popen(
            args,
            start_new_session=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        REAPER.watch_group(process.pid)
        return process
    return subprocess.run(args, capture_output=True, text=True, timeout=120, check=False)


def _stop(process: subprocess.Popen) -> str:
    """End the process group this test started (buildah and what runs in the container)."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)
    REAPER.forget_group(process.pid)
    return process.stdout.read() if process.stdout else ""


def _wait_http(url: str, process: subprocess.Popen, timeout_s: float = 60) -> bytes:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"the container exited ({process.returncode}):\n{_stop(process)}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                return response.read()
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"{url} did not answer in {timeout_s:g} s:\n{_stop(process)}")


def _gateway_uids(session: int) -> set[int]:
    """Real uids of the `kiban serve` processes (not buildah's) in the session this test
    started."""
    uids = set()
    for proc in Path("/proc").iterdir():
        try:
            stat = (proc / "stat").read_text()
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
            status = (proc / "status").read_text()
        except (OSError, ValueError):
            continue
        sid = int(stat.rsplit(")", 1)[1].split()[3])
        runs_kiban = b"serve" in cmdline and any(a.endswith(b"/kiban") for a in cmdline)
        if sid == session and runs_kiban and not cmdline[0].endswith(b"buildah"):
            uid_line = next(line for line in status.splitlines() if line.startswith("Uid:"))
            uids.add(int(uid_line.split()[1]))
    return uids


def test_image_configuration(image):
    assert image["User"] == "10001:10001"
    assert image["Entrypoint"] == ["kiban"]
    assert image["Cmd"] == ["serve", "-c", "/etc/kiban/kiban.yaml"]
    assert image["Healthcheck"]["Test"] == ["CMD", "python", "-m", "kiban.healthcheck"]


def test_gateway_runs_unprivileged_and_its_healthcheck_follows_it(image, container, tmp_path):
    port = _free_port()
    (tmp_path / "kiban.yaml").write_text(
        f"gateway: {{host: 127.0.0.1, port: {port}}}\n"
        "engines:\n  - {name: e, kind: vllm, url: 'http://127.0.0.1:9', models: [m]}\n"
        "routes:\n  - {model: m, engines: [e]}\n"
    )
    # the gateway runs as uid 10001: what is mounted must be readable by others
    tmp_path.chmod(0o755)
    (tmp_path / "kiban.yaml").chmod(0o644)
    health = {"KIBAN_HEALTH_URL": f"http://127.0.0.1:{port}/health"}
    healthcheck = image["Healthcheck"]["Test"][1:]
    command = [*image["Entrypoint"], *image["Cmd"]]
    gateway = _run(container, *command, volumes=(f"{tmp_path}:/etc/kiban:ro",), background=True)
    try:
        _wait_http(f"http://127.0.0.1:{port}/health", gateway)
        models = json.loads(_wait_http(f"http://127.0.0.1:{port}/v1/models", gateway))
        assert [m["id"] for m in models["data"]] == ["m"]
        assert _run(container, *healthcheck, env=health).returncode == 0
        whoami = _run(container, "id", "-u")
        assert whoami.stdout.strip() == "10001"
        assert _gateway_uids(gateway.pid) == {10001}
    finally:
        _stop(gateway)
    dead = _run(container, *healthcheck, env=health)
    assert dead.returncode == 1
    assert "unhealthy" in dead.stderr


def test_the_image_runs_the_prefix_kernel(container):
    # built in the build stage (its compiler and headers stay there), loaded in the final one
    code = "from kiban.gateway.prefix_scan import NATIVE; print(NATIVE)"
    result = _run(container, "python", "-c", code)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "True"


def test_gpu_exporter_serves_from_the_same_image(container):
    port = _free_port()
    exporter = _run(
        container,
        "kiban",
        "gpu-exporter",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        background=True,
    )
    try:
        body = _wait_http(f"http://127.0.0.1:{port}/metrics", exporter).decode()
    finally:
        _stop(exporter)
    # no GPU here: the exporter says so instead of inventing readings
    assert "kiban_gpu_nvml_available 0.0" in body
