"""`kiban doctor` under WSL2: checks read a prepared tree shaped like a WSL2 distribution
(WSL cannot run here), for the GPU path from Windows, the Docker that serves it, its memory."""

from __future__ import annotations

from pathlib import Path

from kiban.deploy.wsl import read_facts, wsl_findings


def _distro(
    root: Path,
    *,
    dxg=True,
    wsl_libs=True,
    linux_driver=False,
    systemd=False,
    desktop=False,
    mem_kib=16 * 1024 * 1024,
) -> Path:
    """Files a WSL2 distribution shows (what the checks read), under *root*."""
    (root / "dev").mkdir(parents=True)
    if dxg:
        (root / "dev" / "dxg").write_text("")
    wsl_lib = root / "usr/lib/wsl/lib"
    wsl_lib.mkdir(parents=True)
    if wsl_libs:
        (wsl_lib / "libcuda.so.1").write_text("")
        (wsl_lib / "libnvidia-ml.so.1").write_text("")
    lib = root / "usr/lib/x86_64-linux-gnu"
    lib.mkdir(parents=True)
    if linux_driver:
        (lib / "libcuda.so.1").write_text("a Linux driver's own copy")
    else:  # what the WSL packages leave: links into /usr/lib/wsl/lib
        (lib / "libnvidia-ml.so.1").symlink_to(wsl_lib / "libnvidia-ml.so.1")
    (root / "etc").mkdir()
    (root / "etc/wsl.conf").write_text("[boot]\nsystemd=true\n" if systemd else "[automount]\n")
    if desktop:
        (root / "mnt/c/Program Files/Docker/Docker").mkdir(parents=True)
    (root / "proc").mkdir()
    (root / "proc/meminfo").write_text(f"MemTotal:       {mem_kib} kB\nMemFree: 1 kB\n")
    return root


def _no_ctk(name: str) -> None:
    return None


def _by_area(findings):
    return {(f.area, f.status): f for f in findings}


def test_a_working_distribution_with_docker_desktop(tmp_path):
    facts = read_facts(_distro(tmp_path, desktop=True), which=_no_ctk)
    assert facts.dxg and facts.wsl_libs and not facts.shadowing_libs
    findings = wsl_findings(facts, {"OperatingSystem": "Docker Desktop", "ServerVersion": "29.0"})
    assert [f.status for f in findings] == ["ok", "ok", "info"]
    assert "Docker Desktop (WSL 2 backend) serves this distribution" in findings[1].detail
    assert "16.0 GiB" in findings[2].detail and ".wslconfig" in findings[2].fix


def test_no_gpu_from_windows(tmp_path):
    facts = read_facts(_distro(tmp_path, dxg=False), which=_no_ctk)
    [gpu, *_] = wsl_findings(facts, None)
    assert (gpu.status, gpu.area) == ("fail", "wsl gpu")
    assert "no /dev/dxg" in gpu.detail and "wsl --update" in gpu.fix


def test_a_linux_driver_inside_wsl_is_named(tmp_path):
    facts = read_facts(_distro(tmp_path, linux_driver=True), which=_no_ctk)
    assert facts.shadowing_libs == ["/usr/lib/x86_64-linux-gnu/libcuda.so.1"]
    failing = [f for f in wsl_findings(facts, None) if f.status == "fail"]
    assert len(failing) == 1
    assert "/usr/lib/x86_64-linux-gnu/libcuda.so.1" in failing[0].detail
    assert "purge" in failing[0].fix


def test_docker_engine_in_the_distribution_needs_the_toolkit(tmp_path):
    root = _distro(tmp_path)
    engine = {"OperatingSystem": "Ubuntu 24.04 LTS", "ServerVersion": "29.0"}
    without = _by_area(wsl_findings(read_facts(root, which=_no_ctk), engine))
    assert "nvidia-ctk runtime configure" in without["wsl docker", "warn"].fix
    with_ctk = read_facts(root, which=lambda name: f"/usr/bin/{name}")
    assert ("wsl docker", "ok") in _by_area(wsl_findings(with_ctk, engine))


def test_docker_desktop_without_integration(tmp_path):
    facts = read_facts(_distro(tmp_path, desktop=True), which=_no_ctk)
    finding = _by_area(wsl_findings(facts, None))["wsl docker", "warn"]
    assert "WSL integration" in finding.fix


def test_a_daemon_that_nothing_starts(tmp_path):
    reason = "Cannot connect to the Docker daemon at unix:///var/run/docker.sock"
    off = read_facts(_distro(tmp_path / "a"), which=_no_ctk)
    finding = _by_area(wsl_findings(off, reason))["wsl docker", "warn"]
    assert reason in finding.detail
    assert "systemd=true" in finding.fix and "/etc/wsl.conf" in finding.fix
    on = read_facts(_distro(tmp_path / "b", systemd=True), which=_no_ctk)
    assert _by_area(wsl_findings(on, reason))["wsl docker", "warn"].fix == (
        "start it: sudo systemctl start docker"
    )


def test_no_docker_at_all_is_only_information(tmp_path):
    facts = read_facts(_distro(tmp_path), which=_no_ctk)
    finding = _by_area(wsl_findings(facts, None))["wsl docker", "info"]
    assert "docs/containers.md" in finding.fix
