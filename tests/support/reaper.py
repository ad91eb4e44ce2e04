"""Engines started by tests die with the test process, even when it is SIGKILLed.

The test process starts one watcher (``python -m tests.support.reaper``, in a
session of its own) and keeps the write end of a pipe to its stdin. Each
engine's process group is registered on that pipe when it starts and
unregistered when a test stops it; commands that undo a daemon's start
(``kiban down -c ...``) can be registered the same way. When the test process
ends for any reason, the kernel closes the pipe; the watcher reads EOF, runs
the registered commands, then SIGTERMs each registered group that still has
members and SIGKILLs what is left after a grace period.

Only groups registered here are signalled; a group with no members is never
signalled (its id could belong to someone else by then).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import IO

from kiban.processes import group_members

REPO_ROOT = Path(__file__).resolve().parents[2]
GRACE_S = 15.0
COMMAND_TIMEOUT_S = 60.0


class Reaper:
    """The test process's side: register process groups and clean-up commands."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pipe: IO[str] | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    def watch_group(self, pgid: int) -> None:
        """Kill group *pgid* if this process dies before :meth:`forget_group`."""
        self._send({"op": "watch", "pgid": pgid})

    def forget_group(self, pgid: int) -> None:
        """The test stopped group *pgid* itself."""
        self._send({"op": "forget", "pgid": pgid})

    def on_death(self, key: str, argv: list[str]) -> None:
        """Run *argv* if this process dies before :meth:`cancel` (e.g. ``kiban down``)."""
        self._send({"op": "command", "key": key, "argv": argv})

    def cancel(self, key: str) -> None:
        """Drop the command registered under *key*."""
        self._send({"op": "cancel", "key": key})

    def _send(self, message: dict) -> None:
        with self._lock:
            if self._pipe is None:
                self._start()
            assert self._pipe is not None
            self._pipe.write(json.dumps(message) + "\n")
            self._pipe.flush()

    def _start(self) -> None:
        read_fd, write_fd = os.pipe()
        log = Path(tempfile.gettempdir()) / f"kiban-test-reaper-{os.getpid()}.log"
        with open(read_fd, "rb") as stdin, log.open("ab") as out:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "tests.support.reaper"],
                stdin=stdin,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=REPO_ROOT,
                env=os.environ | {"PYTHONPATH": str(REPO_ROOT)},
                start_new_session=True,
            )
        self._pipe = open(write_fd, "w", encoding="utf-8")  # noqa: SIM115 (lives as long as we do)


REAPER = Reaper()


def _clean_up(groups: set[int], commands: dict[str, list[str]]) -> None:
    """What the watcher does once the test process is gone."""
    for key, argv in commands.items():
        print(f"running {key}: {argv}", flush=True)
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            subprocess.run(argv, timeout=COMMAND_TIMEOUT_S, stdin=subprocess.DEVNULL, check=False)
    alive = {pgid for pgid in groups if group_members(pgid)}
    for pgid in alive:
        print(f"SIGTERM group {pgid}: {sorted(group_members(pgid))}", flush=True)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGTERM)
    deadline = time.monotonic() + GRACE_S
    while alive and time.monotonic() < deadline:
        time.sleep(0.2)
        alive = {pgid for pgid in alive if group_members(pgid)}
    for pgid in alive:
        print(f"SIGKILL group {pgid}", flush=True)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)


def main() -> None:
    """Read registrations until EOF (the test process is gone), then clean up."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    groups: set[int] = set()
    commands: dict[str, list[str]] = {}
    for line in sys.stdin:
        message = json.loads(line)
        match message["op"]:
            case "watch":
                groups.add(message["pgid"])
            case "forget":
                groups.discard(message["pgid"])
            case "command":
                commands[message["key"]] = message["argv"]
            case "cancel":
                commands.pop(message["key"], None)
    if groups or commands:
        print(f"test process gone: {len(commands)} commands, groups {sorted(groups)}", flush=True)
        _clean_up(groups, commands)


if __name__ == "__main__":
    main()
