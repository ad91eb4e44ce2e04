"""Start, stop, crash and restart REAL inference engines for tests.

Only processes started here are ever signalled, by their own PID / process
group (each engine runs in a new session, so its group id is its PID).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from kiban.engines.llamacpp import LlamaCppStartupLog
from kiban.processes import stat_fields
from tests.support.reaper import REAPER

HEALTH_TIMEOUT_S = 300.0
STOP_TIMEOUT_S = 20.0
LOG_TAIL_CHARS = 6000

#: Environment variable that marks every process a test session starts (engines inherit it).
SESSION_MARKER = "KIBAN_TEST_SESSION"
#: vLLM CPU servers a test session may run at once: each takes a core while it starts.
MAX_VLLM_SERVERS = 2
#: How long a restarted vLLM CPU server may take to be healthy: 2.3 times the restart
#: measured on the loaded 2-core machine (2026-12-01, test_gateway_vllm's restart of a with
#: b idle, other work beside it). Restarting while the other vLLM generates is not bounded:
#: vLLM CPU pins every server's OpenMP threads to core 0 (auto binding reserves core 1), so
#: a busy b starves a's start (bench/vllm_restart.py: not healthy after 20 min); the tests
#: restart only after their load has stopped.
VLLM_RESTART_MEASURED_S = 77.0
VLLM_RESTART_TIMEOUT_S = 180.0
VLLM_SERVER_MODULE = "vllm.entrypoints.openai.api_server"
#: vLLM CPU's OpenMP binding: the cores a server's compute threads run on
VLLM_CPU_BIND = "VLLM_CPU_OMP_THREADS_BIND"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class EngineStartError(RuntimeError):
    """The engine exited or never became healthy; the message ends with its log tail."""


@dataclass
class EngineProcess:
    """One engine server process: a command line, a port, a log file."""

    name: str
    argv: list[str]
    port: int
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    health_path: str = "/health"
    proc: subprocess.Popen | None = None
    startup_seconds: float | None = None
    _launched_at: float = 0.0

    @property
    def is_vllm(self) -> bool:
        """A vLLM OpenAI server (counted against MAX_VLLM_SERVERS)."""
        return VLLM_SERVER_MODULE in self.argv

    @property
    def base_url(self) -> str:
        """Root URL of the server, e.g. http://127.0.0.1:PORT."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        """PID of the running server, None when not started."""
        return self.proc.pid if self.proc else None

    def start(self, timeout: float = HEALTH_TIMEOUT_S) -> EngineProcess:
        """Launch the server in its own session and wait for a 200 from the health path."""
        self.launch()
        return self.wait_started(timeout)

    def launch(self) -> EngineProcess:
        """Start the process without waiting (see :func:`start_together`)."""
        if self.running():
            raise RuntimeError(f"{self.name} already running as PID {self.pid}")
        if self.is_vllm and len(running := vllm_servers_in_session()) >= MAX_VLLM_SERVERS:
            raise RuntimeError(
                f"{self.name}: {len(running)} vLLM servers of this test session run already "
                f"(PIDs {running}); at most {MAX_VLLM_SERVERS} may run at once: stop one first"
            )
        if self.is_vllm and VLLM_CPU_BIND not in self.env:
            self.env[VLLM_CPU_BIND] = str(_free_core(running))
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._launched_at = time.monotonic()
        with self.log_path.open("ab") as log:
            log.write(f"\n$ {' '.join(self.argv)}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=os.environ | self.env,
                start_new_session=True,
            )
        REAPER.watch_group(self.proc.pid)
        return self

    def wait_started(self, timeout: float = HEALTH_TIMEOUT_S) -> EngineProcess:
        """Wait until a launched server is healthy; kill it and raise if it is not."""
        try:
            self._wait_healthy(timeout)
        except BaseException:
            self.kill()
            raise
        self.startup_seconds = time.monotonic() - self._launched_at
        return self

    def running(self) -> bool:
        """True while our process exists and has not exited."""
        return self.proc is not None and not self._leader_exited()

    def healthy(self) -> bool:
        """One GET of the health path answered 200."""
        try:
            with urllib.request.urlopen(self.base_url + self.health_path, timeout=2) as resp:
                return resp.status == 200
        except (OSError, urllib.error.URLError):
            return False

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> int | None:
        """SIGTERM our process group, wait, then SIGKILL it; returns the exit code."""
        if self.proc is None:
            return None
        if not self._leader_exited():
            self._signal_group(signal.SIGTERM)
            if not self._wait_leader(timeout):
                self._signal_group(signal.SIGKILL)
        return self._reap()

    def kill(self) -> int | None:
        """SIGKILL our process group at once, as a crash would; returns the exit code."""
        if self.proc is None:
            return None
        self._signal_group(signal.SIGKILL)
        return self._reap()

    def restart(self, timeout: float = HEALTH_TIMEOUT_S) -> EngineProcess:
        """Stop (if running) and start again on the same port."""
        self.stop()
        _wait_port_free(self.port, STOP_TIMEOUT_S)
        self.proc = None
        return self.start(timeout)

    def log_tail(self, chars: int = LOG_TAIL_CHARS) -> str:
        """The end of the engine's log file."""
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")[-chars:]
        except OSError:
            return ""

    def wait_for_log(self, needle: str, timeout: float = 10.0) -> str:
        """The whole log once it contains ``needle`` (kiban writes request lines a moment
        after the response, so a test that just got its answer may have to wait for it)."""
        deadline = time.monotonic() + timeout
        while needle not in (text := self.log_tail(10**8)):
            assert time.monotonic() < deadline, f"{needle!r} not in {self.log_path}"
            time.sleep(0.05)
        return text

    def _signal_group(self, sig: signal.Signals) -> None:
        """Signal the process group our child leads (PGID == its PID).

        Only called while the leader is alive or an unreaped zombie, so the PID
        (and with it the group id) cannot have been reused by another process.
        """
        assert self.proc is not None
        if self.proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, sig)

    def _leader_exited(self) -> bool:
        """Has the leader exited? Does not reap it (WNOWAIT keeps its PID ours)."""
        assert self.proc is not None
        if self.proc.returncode is not None:
            return True
        flags = os.WEXITED | os.WNOHANG | os.WNOWAIT
        try:
            return os.waitid(os.P_PID, self.proc.pid, flags) is not None
        except ChildProcessError:
            return True

    def _wait_leader(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not self._leader_exited():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.1)
        return True

    def _reap(self) -> int:
        """Kill what is left of the group (engine workers), then reap the leader."""
        assert self.proc is not None
        if not self._wait_leader(STOP_TIMEOUT_S):
            self._signal_group(signal.SIGKILL)
        self._signal_group(signal.SIGKILL)
        code = self.proc.wait(STOP_TIMEOUT_S)
        REAPER.forget_group(self.proc.pid)
        return code

    def _wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._leader_exited():
                code = self._reap()
                raise EngineStartError(
                    f"{self.name} exited with code {code} before it was "
                    f"healthy; log {self.log_path}:\n{self.log_tail()}"
                )
            if self.healthy():
                return
            time.sleep(1.0)
        raise EngineStartError(
            f"{self.name} not healthy after {timeout:.0f}s on port {self.port}; "
            f"log {self.log_path}:\n{self.log_tail()}"
        )


def stop_all(engines: list[EngineProcess]) -> None:
    """Stop every engine, last started first, even when stopping one of them fails."""
    errors = []
    for engine in reversed(engines):
        try:
            engine.stop()
        except Exception as exc:
            errors.append(exc)
    if errors:
        raise errors[0]


def _free_core(vllm_pids: list[int]) -> int:
    """The first CPU core that none of the given vLLM servers is bound to.

    vLLM's CPU backend binds its OpenMP threads to core 0 of every server by default
    ("core ids=[0], reserved_cpus=[1]" in each log), so two servers of a test share one
    core while the other idles, and a restarting server starves beside a busy one.
    """
    cores = sorted(os.sched_getaffinity(0))
    taken = {_environ_of(pid).get(VLLM_CPU_BIND) for pid in vllm_pids}
    return next((c for c in cores if str(c) not in taken), cores[0])


def _environ_of(pid: int) -> dict[str, str]:
    """The environment a process started with ({} when it is gone or not ours)."""
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    pairs = (item.split(b"=", 1) for item in raw.split(b"\0") if b"=" in item)
    return {k.decode(errors="replace"): v.decode(errors="replace") for k, v in pairs}


def vllm_servers_in_session() -> list[int]:
    """PIDs of the vLLM servers this test session started, directly or through `kiban up`.

    A server is a process-group leader (every engine runs in a session of its own)
    running vLLM's OpenAI server with this session's marker in its environment.
    """
    marker = f"{SESSION_MARKER}={os.environ.get(SESSION_MARKER, '')}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        fields = stat_fields(pid)
        if fields is None or int(fields[2]) != pid or fields[0] == "Z":
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if VLLM_SERVER_MODULE.encode() in argv and marker in environ:
            found.append(pid)
    return sorted(found)


def start_together(*engines: EngineProcess, timeout: float = HEALTH_TIMEOUT_S) -> None:
    """Launch every engine at once, then wait for each (start-up overlaps)."""
    for engine in engines:
        engine.launch()
    try:
        for engine in engines:
            engine.wait_started(timeout)
    except BaseException:
        for engine in engines:
            engine.kill()
        raise


def _wait_port_free(port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(("127.0.0.1", port))
                return
            except OSError:
                time.sleep(0.5)
    raise RuntimeError(f"port {port} still busy after {timeout}s")


def vllm_server(
    python: Path,
    model_dir: Path,
    served_name: str,
    log_dir: Path,
    *,
    port: int | None = None,
    kv_cache_gib: int = 1,
    max_model_len: int = 2048,
    extra_args: tuple[str, ...] = (),
) -> EngineProcess:
    """An (unstarted) vLLM OpenAI server for `model_dir` from the given venv Python."""
    port = port or free_port()
    argv = [
        str(python),
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(model_dir),
        "--served-model-name",
        served_name,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--max-model-len",
        str(max_model_len),
        *extra_args,
    ]
    env = {
        "VLLM_CPU_KVCACHE_SPACE": str(kv_cache_gib),
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    log = log_dir / f"vllm-{served_name}-{port}.log"
    return EngineProcess(name=f"vllm:{served_name}", argv=argv, port=port, log_path=log, env=env)


def llamacpp_server(
    binary: Path,
    gguf_path: Path,
    served_name: str,
    log_dir: Path,
    *,
    port: int | None = None,
    ctx: int = 2048,
    parallel: int = 2,
    extra_args: tuple[str, ...] = (),
) -> EngineProcess:
    """An (unstarted) llama.cpp ``llama-server`` for one GGUF file, on the CPU.

    Every sizing flag is explicit (``-c`` total context, ``-np`` slots, ``-ngl 0``,
    ``--fit off``) so that llama.cpp allocates exactly what a test computes;
    ``--alias`` makes /v1/models list `served_name`.
    """
    port = port or free_port()
    argv = [
        str(binary),
        "--model",
        str(gguf_path),
        "--alias",
        served_name,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "-c",
        str(ctx),
        "-np",
        str(parallel),
        "-ngl",
        "0",
        "--fit",
        "off",
        "--metrics",
        *LlamaCppStartupLog.args,
        *extra_args,
    ]
    log = log_dir / f"llamacpp-{served_name}-{port}.log"
    return EngineProcess(name=f"llamacpp:{served_name}", argv=argv, port=port, log_path=log)
