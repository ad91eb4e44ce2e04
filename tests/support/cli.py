"""Run the `kiban` command line as a user does, from tests.

Every `kiban up` is registered with the reaper: if the test process dies before
the matching `kiban down`, the reaper runs that `kiban down` itself, so no
supervisor daemon or engine of a test outlives the test process.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.support.gateway import KIBAN, REPO_ROOT
from tests.support.reaper import REAPER


def _down_on_death(config: str) -> str:
    key = f"kiban down -c {config}"
    REAPER.on_death(key, [str(KIBAN), "down", "-c", config])
    return key


def kiban(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """`kiban ARGS` from the repository root; output captured as text."""
    config = args[args.index("-c") + 1] if "-c" in args else None
    if args[:1] == ("up",) and config:
        _down_on_death(config)
    result = subprocess.run(
        [str(KIBAN), *args], capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT
    )
    if args[:1] == ("down",) and config and result.returncode == 0:
        REAPER.cancel(f"kiban down -c {config}")
    return result


def kiban_up_popen(config: Path) -> subprocess.Popen[str]:
    """`kiban up -c CONFIG` in the foreground, output piped (the caller ends it)."""
    _down_on_death(str(config))
    return subprocess.Popen(
        [str(KIBAN), "up", "-c", str(config)],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


@contextmanager
def kiban_up_detached(config: Path, *, timeout: float) -> Iterator[None]:
    """`kiban up -d` for the block, `kiban down` after it, whatever happened inside."""
    try:
        result = kiban("up", "-c", str(config), "-d", timeout=timeout)
        assert result.returncode == 0, result.stderr
        yield
    finally:
        down = kiban("down", "-c", str(config), timeout=300)
    assert down.returncode == 0, down.stderr
