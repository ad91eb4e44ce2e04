"""Processes a benchmark starts: pinned to CPUs, logged, measured from /proc, stopped by PID.

Each service runs in a session of its own (its process group id is its PID),
so stopping it stops what it forked too, and nothing else is ever signalled.
CPU time is utime + stime of the process and every live descendant, plus
cutime + cstime (children already reaped), from /proc/PID/stat.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from kiban.processes import ProcessId, spawn, stat_fields, stop_group, tail

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
#: the kiban CLI of this interpreter, also where no `kiban` script is on PATH
KIBAN_CLI = [sys.executable, "-m", "kiban.cli"]


def stop_on_sigterm() -> None:
    """SIGTERM (``timeout``, a CI runner) raises SystemExit, so the ``finally`` blocks that
    stop what the benchmark started run, instead of leaving its engines behind."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def pinned(argv: list[str], cpus: str | None) -> list[str]:
    """*argv* run by ``taskset -c CPUS`` (same PID: taskset execs it), or as is."""
    return ["taskset", "-c", cpus, *argv] if cpus else argv


def process_tree(root: int) -> list[int]:
    """*root* and its live descendants."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            fields = stat_fields(int(entry.name))
            if fields is not None:
                children.setdefault(int(fields[1]), []).append(int(entry.name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo += children.get(pid, [])
    return tree


def cpu_seconds(root: int) -> float:
    """User + system CPU time of *root*'s process tree, reaped children included."""
    ticks = 0
    for pid in process_tree(root):
        fields = stat_fields(pid)
        if fields is not None:
            ticks += sum(int(v) for v in fields[11:15])  # utime stime cutime cstime
    return ticks / CLOCK_TICKS


def rss_bytes(pid: int) -> int:
    """Resident set size of one process."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for PID {pid}")


class ServiceError(RuntimeError):
    """A service exited or never answered; the message ends with its log."""


@dataclass
class Service:
    """A server process the benchmark owns."""

    name: str
    argv: list[str]
    log: Path
    env: dict[str, str] = field(default_factory=dict)
    cpus: str | None = None
    proc: subprocess.Popen[bytes] | None = None
    ident: ProcessId | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> Service:
        self.proc = spawn(pinned(self.argv, self.cpus), os.environ | self.env, self.log)
        self.ident = ProcessId.of(self.proc.pid)
        return self

    def wait_ready(
        self,
        url: str,
        body: bytes | None = None,
        timeout_s: float = 120.0,
        headers: dict[str, str] | None = None,
    ) -> None:
        """Until *url* answers 200 (a POST of *body* when given)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise ServiceError(
                    f"{self.name} exited with {self.proc.returncode}; {self.log}:\n{tail(self.log)}"
                )
            if http_status(url, body, headers) == 200:
                return
            time.sleep(0.25)
        raise ServiceError(
            f"{self.name} not ready after {timeout_s:g} s; {self.log}:\n{tail(self.log)}"
        )

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.pid)

    def stop(self) -> None:
        if self.ident is not None and self.proc is not None:
            stop_group(self.ident, 15.0, self.proc)
        elif self.proc is not None:  # exited before its identity was read
            self.proc.wait(5)
        self.ident = None


def http_status(url: str, body: bytes | None = None, headers: dict[str, str] | None = None) -> int:
    """Status of one request (0 when nothing answered)."""
    request = urllib.request.Request(url, data=body, headers=headers or {})
    if body is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=5) as resp:
            resp.read()
            return resp.status
    except urllib.error.HTTPError as err:
        return err.code
    except (OSError, urllib.error.URLError):
        return 0


def require_tools(*names: str) -> None:
    """Exit with a clear message when a program the benchmark runs is missing."""
    missing = [n for n in names if shutil.which(n) is None]
    if missing:
        raise SystemExit(
            f"missing programs: {', '.join(missing)}; install them with scripts/bootstrap.sh "
            f"(Debian packages: {', '.join(sorted({_PACKAGES.get(n, n) for n in missing}))})"
        )


_PACKAGES = {"nginx": "nginx", "wrk": "wrk", "taskset": "util-linux"}
