"""Prometheus' own tools from the Debian package ``prometheus`` (scripts/debian-packages.txt)."""

from __future__ import annotations

import shutil
import subprocess

import pytest


def binary(name: str) -> str:
    """Path of ``prometheus`` or ``promtool``; fails the test, naming the package, if missing."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} not found: install the Debian package 'prometheus' (make bootstrap)")
    return path


def promtool(*args: str, stdin: bytes | None = None, cwd: str | None = None):
    """Run promtool; returns the CompletedProcess (text output)."""
    return subprocess.run(
        [binary("promtool"), *args],
        input=stdin.decode() if stdin is not None else None,
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=120,
    )
