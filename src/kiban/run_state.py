"""What `kiban up` runs, on disk, so that `status`, `logs` and `down` work from any shell.

Everything for one kiban.yaml lives in ``.kiban/<config name>/`` beside it:
``state.json`` (written atomically, by the supervisor only), ``logs/`` with one
file per engine plus ``gateway.log`` and ``supervisor.log``, and ``lock``,
which the running supervisor holds.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any, Literal

from kiban.processes import ProcessId

EngineState = Literal["starting", "running", "restarting", "failed", "stopped"]
#: set by the supervisor for the gateway it starts: where state.json is
RUN_STATE_ENV = "KIBAN_RUN_STATE"


def write_atomically(path: Path, data: bytes, mode: int = 0o666) -> None:
    """Replace *path* with *data* so that readers never see half a file (*mode* before umask)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode), "wb") as fh:
        fh.write(data)
    tmp.replace(path)


@dataclass
class ProcessRecord:
    """One supervised server process (an engine or the gateway)."""

    name: str
    url: str
    log: str
    state: EngineState = "starting"
    pid: int | None = None
    start_ticks: int | None = None
    started_at: float | None = None
    restarts: int = 0
    message: str = ""
    kind: str = ""
    model: str = ""
    device: str = ""
    gpus: list[int] = field(default_factory=list)
    gpu_verified: bool | None = None

    @property
    def ident(self) -> ProcessId | None:
        if self.pid is None or self.start_ticks is None:
            return None
        return ProcessId(self.pid, self.start_ticks)


@dataclass
class RunState:
    """The whole of one `kiban up`: its supervisor, gateway and engines."""

    config: str
    supervisor_pid: int | None = None
    supervisor_start_ticks: int | None = None
    gateway: ProcessRecord | None = None
    engines: dict[str, ProcessRecord] = field(default_factory=dict)
    updated_at: float = 0.0

    @property
    def supervisor(self) -> ProcessId | None:
        if self.supervisor_pid is None or self.supervisor_start_ticks is None:
            return None
        return ProcessId(self.supervisor_pid, self.supervisor_start_ticks)

    def records(self) -> list[ProcessRecord]:
        """Engines first, then the gateway."""
        return [*self.engines.values(), *([self.gateway] if self.gateway else [])]


class RunDir:
    """The ``.kiban/<config name>/`` folder of one configuration file."""

    def __init__(self, config_path: Path) -> None:
        config_path = config_path.resolve()
        self.config_path = config_path
        self.root = config_path.parent / ".kiban" / config_path.stem
        self.logs = self.root / "logs"
        self.state_file = self.root / "state.json"
        self._lock_fh: IO[str] | None = None

    def log_path(self, name: str) -> Path:
        return self.logs / f"{name}.log"

    def read(self) -> RunState | None:
        """The last state written, or None when kiban never ran this configuration."""
        try:
            data: dict[str, Any] = json.loads(self.state_file.read_text())
        except (OSError, ValueError):
            return None
        gateway = data.pop("gateway", None)
        engines = data.pop("engines", {})
        return RunState(
            **data,
            gateway=ProcessRecord(**gateway) if gateway else None,
            engines={name: ProcessRecord(**rec) for name, rec in engines.items()},
        )

    def write(self, state: RunState) -> None:
        """Replace state.json atomically (readers never see half a file)."""
        state.updated_at = time.time()
        write_atomically(self.state_file, (json.dumps(asdict(state), indent=2) + "\n").encode())

    def try_lock(self) -> bool:
        """Take the supervisor lock; False when another live supervisor holds it."""
        self.root.mkdir(parents=True, exist_ok=True)
        fh = (self.root / "lock").open("w")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.close()
            return False
        self._lock_fh = fh
        return True

    def unlock(self) -> None:
        if self._lock_fh is not None:
            fcntl.flock(self._lock_fh, fcntl.LOCK_UN)
            self._lock_fh.close()
            self._lock_fh = None


def gpu_verdicts(state_file: str | None) -> dict[str, bool]:
    """The supervisor's GPU verdict per managed GPU engine (engines not yet judged are left out).

    Read by the gateway after each round of health checks, for the
    ``kiban_engine_gpu_verified`` metric; a missing or unreadable file means none.
    """
    if not state_file:
        return {}
    try:
        engines = json.loads(Path(state_file).read_text()).get("engines", {})
    except (OSError, ValueError):
        return {}
    return {
        name: bool(rec["gpu_verified"])
        for name, rec in engines.items()
        if rec.get("gpus") and rec.get("gpu_verified") is not None
    }
