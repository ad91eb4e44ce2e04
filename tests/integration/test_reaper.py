"""Processes a test starts die with the test process, even when that is SIGKILLed.

An inner pytest (a real one, on a test written here) starts an engine through
tests/support/engines.py and registers a clean-up command, then waits; the outer
test SIGKILLs it, as the kernel's OOM killer would, and watches both happen.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kiban.processes import group_members
from tests.support.gateway import REPO_ROOT

pytestmark = pytest.mark.slow  # left out of `make check`

INNER_TEST = """
import json, os, sys, time
from pathlib import Path
from tests.support.gateway import fault_upstream
from tests.support.reaper import REAPER

def test_hold(tmp_path):
    engine = fault_upstream(tmp_path).start(30)
    marker = Path(os.environ["REAPER_MARKER"])
    REAPER.on_death("touch", [sys.executable, "-c", f"open({str(marker)!r}, 'w').close()"])
    Path(os.environ["REAPER_STATE"]).write_text(json.dumps({"engine": engine.pid}))
    time.sleep(600)
"""


def test_engines_and_commands_outlive_no_killed_test_process(tmp_path: Path) -> None:
    (tmp_path / "test_inner.py").write_text(INNER_TEST)
    state, marker = tmp_path / "state.json", tmp_path / "cleaned-up"
    inner = subprocess.Popen(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
        cwd=REPO_ROOT,
        env=os.environ | {"REAPER_STATE": str(state), "REAPER_MARKER": str(marker)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    engine = None
    try:
        deadline = time.monotonic() + 120
        while not state.exists():
            assert inner.poll() is None, "the inner pytest ended before it started its engine"
            assert time.monotonic() < deadline, "the inner pytest never started its engine"
            time.sleep(0.2)
        engine = json.loads(state.read_text())["engine"]
        assert group_members(engine)
        os.killpg(inner.pid, signal.SIGKILL)
        inner.wait(10)
        deadline = time.monotonic() + 60
        while group_members(engine) or not marker.exists():
            assert time.monotonic() < deadline, (
                f"after the test process died: engine group {group_members(engine)}, "
                f"clean-up command ran: {marker.exists()}"
            )
            time.sleep(0.2)
    finally:
        if inner.poll() is None:
            os.killpg(inner.pid, signal.SIGKILL)
            inner.wait(10)
        if engine is not None and group_members(engine):
            os.killpg(engine, signal.SIGKILL)
