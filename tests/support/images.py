"""Build and run container images here, without a Docker daemon: Debian's buildah, as root,
with chroot isolation and the host's network.

The Dockerfile's base (python:3.12-slim by digest) lives on Docker Hub, which this machine
cannot reach; its ``PYTHON_IMAGE`` build argument takes a local stand-in instead: Debian
bookworm's minimal system with python3, venv and its headers, made by debootstrap from
Debian's own mirror and trusting the certificates this host trusts (so pip inside the
build reaches PyPI the way the host's pip does). The stand-in is built once and kept
(``buildah images``).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

import pytest

SUITE = "bookworm"
# python3-dev: the headers the official python images carry (the Dockerfile compiles a kernel)
PACKAGES = ("python3", "python3-venv", "python3-dev", "ca-certificates")
MIRROR = os.environ.get("KIBAN_DEBIAN_MIRROR", "http://deb.debian.org/debian")
HOST_CA = Path("/etc/ssl/certs/ca-certificates.crt")
#: the image's PATH, as Debian's (and the official python images') root shell has it
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_EMPTIED = ("proc", "sys", "dev", "run", "tmp", "var/cache/apt/archives")


def tool(name: str) -> str:
    """Path of *name*; fails the test naming its Debian package (make bootstrap installs it)."""
    path = shutil.which(name) or (
        f"/usr/sbin/{name}" if Path(f"/usr/sbin/{name}").exists() else None
    )
    if path is None:
        pytest.fail(f"{name} not found: install the Debian package {name!r} (make bootstrap)")
    return path


def buildah(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """Run buildah; a failure fails the test with buildah's own output."""
    result = subprocess.run(
        [tool("buildah"), *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    if result.returncode != 0:
        pytest.fail(
            f"buildah {' '.join(args)} failed:\n{result.stdout[-3000:]}{result.stderr[-3000:]}"
        )
    return result


def base_image() -> str:
    """The local stand-in for the Dockerfile's base image, built on first use."""
    if os.geteuid() != 0:
        pytest.fail("building images with buildah here needs root (as CI runs)")
    ca = HOST_CA.read_bytes() if HOST_CA.exists() else b""
    digest = hashlib.sha256(f"{SUITE} {PACKAGES} {PATH}".encode() + ca).hexdigest()[:12]
    tag = f"localhost/kiban-test-base:{SUITE}-{digest}"
    known = subprocess.run(
        [tool("buildah"), "inspect", "--type", "image", tag],
        capture_output=True,
        timeout=60,
        check=False,
    )
    if known.returncode == 0:
        return tag
    with tempfile.TemporaryDirectory(prefix="kiban-rootfs-") as tmp:
        root = Path(tmp) / "rootfs"
        include = ",".join(PACKAGES)
        result = subprocess.run(
            [
                tool("debootstrap"),
                "--variant=minbase",
                f"--include={include}",
                SUITE,
                str(root),
                MIRROR,
            ],
            capture_output=True,
            text=True,
            timeout=900,
            check=False,
        )
        _unmount_below(root)
        if result.returncode != 0:
            pytest.fail(f"debootstrap failed:\n{result.stdout[-3000:]}{result.stderr[-3000:]}")
        if ca:
            (root / "etc/ssl/certs/ca-certificates.crt").write_bytes(ca)
        (root / "etc/pip.conf").write_text("[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n")
        archive = Path(tmp) / "rootfs.tar"
        with tarfile.open(archive, "w") as tar:
            tar.add(root, arcname=".", filter=_without_runtime_files)
        container = buildah("from", "scratch", timeout=60).stdout.strip()
        try:
            buildah("add", container, str(archive), "/")
            buildah("config", "--env", f"PATH={PATH}", container, timeout=60)
            buildah("commit", "--quiet", container, tag)
        finally:
            buildah("rm", container, timeout=60)
    return tag


def _without_runtime_files(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
    name = info.name.removeprefix("./")
    if any(name.startswith(f"{d}/") for d in _EMPTIED):
        return None
    return info


def _unmount_below(root: Path) -> None:
    """debootstrap mounts /proc (and more) inside the new system; leave nothing mounted."""
    mounts = [
        line.split()[1]
        for line in Path("/proc/mounts").read_text().splitlines()
        if line.split()[1].startswith(str(root))
    ]
    for mount in sorted(mounts, reverse=True):
        subprocess.run(["umount", "-l", mount], check=False, timeout=60)
