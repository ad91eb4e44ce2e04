"""Server processes that kiban starts, finds again by PID, and stops.

A process is known by its PID *and* its start time (field 22 of
/proc/PID/stat), so a PID the kernel reused for another program is never
signalled. Each server runs in a session of its own, so the whole group
(vLLM's EngineCore, lmdeploy's workers) is stopped together; a supervisor that
did not start the process (``kiban up --detach`` hands over to a daemon) can
still watch and stop it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ProcessId:
    """A PID plus the kernel's start time of that process (clock ticks since boot)."""

    pid: int
    start_ticks: int

    @classmethod
    def of(cls, pid: int) -> ProcessId | None:
        """The identity of a running process, None when there is none."""
        ticks = _start_ticks(pid)
        return None if ticks is None else cls(pid, ticks)

    def alive(self) -> bool:
        """The same process still runs (and is no zombie)."""
        stat = stat_fields(self.pid)
        return stat is not None and int(stat[19]) == self.start_ticks and stat[0] != "Z"


def stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name: [state, ppid, pgrp, ...]."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rsplit(")", 1)[1].split()


def _start_ticks(pid: int) -> int | None:
    fields = stat_fields(pid)
    return None if fields is None else int(fields[19])


def group_members(pgid: int) -> set[int]:
    """Live PIDs whose process group is *pgid* (an engine and the workers it forked)."""
    members = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        fields = stat_fields(int(entry.name))
        if fields is not None and int(fields[2]) == pgid and fields[0] != "Z":
            members.add(int(entry.name))
    return members


def spawn(argv: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    """Start *argv* in a new session with stdout and stderr appended to *log_path*."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        log.write(f"\n--- {time.strftime('%Y-%m-%d %H:%M:%S')} $ {' '.join(argv)}\n".encode())
        log.flush()
        return subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )


def stop_group(
    ident: ProcessId, grace_s: float, child: subprocess.Popen[bytes] | None = None
) -> None:
    """SIGTERM the process group led by *ident*, SIGKILL it after *grace_s*; reap *child*."""
    if ident.alive():
        _signal_group(ident.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while ident.alive() and time.monotonic() < deadline:
            if child is not None:
                child.poll()
            time.sleep(0.1)
    if ident.alive() or group_members(ident.pid):
        _signal_group(ident.pid, signal.SIGKILL)
    if child is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.wait(5)


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def tail(path: Path, lines: int = 30) -> str:
    """The last *lines* lines of a text file ('' when it does not exist)."""
    try:
        with path.open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - 256 * 1024))
            data = fh.read()
    except OSError:
        return ""
    return "\n".join(data.decode("utf-8", "replace").splitlines()[-lines:])
