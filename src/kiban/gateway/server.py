"""Running the gateway: uvicorn (uvloop + httptools), one process or N worker processes.

With ``--workers N`` every worker binds its own listening socket with
``SO_REUSEPORT``, so the kernel spreads new connections evenly over them (a
shared accept socket lets one idle worker win most connections). The parent
process only supervises: it restarts a worker that dies and passes SIGTERM /
SIGINT on for a graceful stop. Metrics of all workers are merged through
prometheus_client's multiprocess directory, so /metrics shows one view
whichever worker answers.

SIGTERM: stop accepting, let requests and streams in flight finish within
``gateway.shutdown_grace_s``, end those still running with an error event.
SIGHUP (``kiban reload``): load the configuration again; if it is valid,
apply it without dropping anything in flight, else log its problems and keep
the running one. With workers the parent checks it first, keeps a copy of
the last valid one (a worker restarted later starts from that copy, not from
a file that may have been broken since) and passes the signal on. Each
process reports the outcome of a reload in ``.kiban/<config>/reload/<pid>.json``
and the serving process's PIDs are in ``.kiban/<config>/gateway.json``.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import uvicorn

from kiban.config import ConfigError, KibanConfig, load_config
from kiban.gateway.app import Gateway
from kiban.gateway.auth import ApiKey, load_keys
from kiban.gateway.server_protocol import GuardedHttpToolsProtocol, KibanServer, KibanUvicornConfig
from kiban.planning.plan import plan_view
from kiban.processes import ProcessId
from kiban.run_state import RunDir, write_atomically

CONFIG_ENV = "KIBAN_CONFIG"
CONFIG_BASE_ENV = "KIBAN_CONFIG_BASE"
OVERRIDES_ENV = "KIBAN_GATEWAY_OVERRIDES"
LOG_LEVEL_ENV = "KIBAN_LOG_LEVEL"
RELOAD_DIR_ENV = "KIBAN_RELOAD_DIR"
_RESTART_DELAY_S = 1.0
_PARENT_GRACE_EXTRA_S = 5.0

log = logging.getLogger("kiban.server")


def configure_logging(level: str = "info") -> None:
    """kiban's own log lines go to stderr (request lines: kiban.gateway.request_log)."""
    other = logging.StreamHandler(sys.stderr)
    other.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("kiban")
    root.handlers[:] = [other]
    root.setLevel(level.upper())


def with_overrides(config: KibanConfig, overrides: dict[str, object]) -> KibanConfig:
    """*config* with the command line's ``gateway`` settings (--port ...) applied."""
    if not overrides:
        return config
    gateway = config.gateway.model_copy(update=overrides)
    return config.model_copy(update={"gateway": gateway})


def load_serving_config(path: str | None = None) -> tuple[KibanConfig, list[ApiKey]]:
    """The configuration a gateway process serves (from the environment serve() set), with keys.

    *path* replaces the configuration file (not its folder). Raises ConfigError
    naming every problem.
    """
    base = os.environ.get(CONFIG_BASE_ENV)
    config = load_config(path or os.environ[CONFIG_ENV], base_dir=Path(base) if base else None)
    config = with_overrides(config, json.loads(os.environ.get(OVERRIDES_ENV) or "{}"))
    return config, load_keys(config.gateway.api_keys)


def build_app(config: KibanConfig, keys: list[ApiKey]) -> Gateway:
    """The gateway of one serving process: reloads from the configuration in the environment."""
    configure_logging(os.environ.get(LOG_LEVEL_ENV, "info"))
    app = Gateway(config, keys)
    app.config_source = lambda: load_serving_config()
    app.plan_view = plan_view
    reload_dir = os.environ.get(RELOAD_DIR_ENV)
    if reload_dir:
        status = Path(reload_dir) / f"{os.getpid()}.json"
        app.on_reload = lambda outcome: write_json(status, outcome)
    if config.observability.gpu_exporter == "gateway":
        add_gpu_collector(app, watch_xid=config.gateway.workers == 1)
    return app


def write_json(path: Path, data: dict[str, object]) -> None:
    """Replace *path* atomically; a state file that cannot be written is only logged."""
    try:
        write_atomically(path, (json.dumps(data, indent=2) + "\n").encode())
    except OSError as err:
        log.warning("cannot write %s: %s", path, err.strerror)


def add_gpu_collector(app: Gateway, watch_xid: bool, nvml: object | None = None) -> bool:
    """NVML GPU metrics on the gateway's /metrics, when this machine has an NVIDIA driver.

    *nvml* replaces the pynvml module (tests). Returns whether GPU metrics were added.
    """
    from kiban.observability.gpu import GpuCollector

    collector = GpuCollector(nvml, watch_xid=watch_xid)
    log = logging.getLogger("kiban.gpu")
    if collector.available:
        app.metrics.add_collector(collector)
        log.info("GPU metrics on /metrics: %s", collector.describe_state())
        return True
    log.info("%s; /metrics has no kiban_gpu_* series", collector.describe_state())
    return False


def _uvicorn_config(config: KibanConfig, keys: list[ApiKey], log_level: str) -> uvicorn.Config:
    gw = config.gateway
    return KibanUvicornConfig(
        functools.partial(build_app, config, keys),  # built in uvicorn's loop, from what is loaded
        factory=True,
        loop="uvloop",
        http=GuardedHttpToolsProtocol,
        lifespan="on",
        access_log=False,
        proxy_headers=False,  # kiban reads no client address: no middleware per request
        server_header=False,
        log_level=log_level,
        timeout_keep_alive=gw.http.keepalive_timeout_s,
        timeout_graceful_shutdown=math.ceil(gw.shutdown_grace_s),
        client_limits=gw.http,
    )


def listening_socket(host: str, port: int, *, reuse_port: bool) -> socket.socket:
    """A bound TCP socket for *host*:*port* (IPv4 or IPv6), listening unless port-reserving."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # accepted connections inherit it: a stream's headers and first event must not wait
    # for the client's delayed ACK (Nagle held the first token back by ~3 ms)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(address)
    sock.set_inheritable(True)
    return sock


def _exit_with_parent() -> None:
    """Stop this worker gracefully if the supervising parent dies (even by SIGKILL)."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def run_worker() -> None:
    """Entry point of one worker process (``python -m kiban.gateway.server``)."""
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # until the gateway's own handler is in place
    _exit_with_parent()
    host, port = os.environ["KIBAN_WORKER_HOST"], int(os.environ["KIBAN_WORKER_PORT"])
    sock = listening_socket(host, port, reuse_port=True)
    sock.listen(2048)
    config, keys = load_serving_config()
    server = KibanServer(_uvicorn_config(config, keys, os.environ.get(LOG_LEVEL_ENV, "info")))
    server.run(sockets=[sock])


def serve(
    config_path: Path,
    config: KibanConfig,
    keys: list[ApiKey],
    overrides: dict[str, object],
    log_level: str = "info",
) -> None:
    """Serve until interrupted. *config* is validated, with *overrides* of ``gateway`` applied;
    *keys* are its API keys (workers load both again themselves)."""
    gw = config.gateway
    run_dir = RunDir(config_path)
    os.environ[CONFIG_ENV] = str(config_path.resolve())
    os.environ[CONFIG_BASE_ENV] = str(config_path.resolve().parent)
    os.environ[OVERRIDES_ENV] = json.dumps(overrides)
    os.environ[LOG_LEVEL_ENV] = log_level
    os.environ[RELOAD_DIR_ENV] = str(run_dir.root / "reload")
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # until a handler of ours is in place
    if gw.workers == 1:
        sock = listening_socket(gw.host, gw.port, reuse_port=False)
        sock.listen(2048)
        _write_serving(run_dir, sock.getsockname()[1], [os.getpid()])
        try:
            KibanServer(_uvicorn_config(config, keys, log_level)).run(sockets=[sock])
        finally:
            _clear_serving(run_dir)
        return
    configure_logging(log_level)
    state_dir = tempfile.mkdtemp(prefix="kiban-gateway-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = state_dir
    # Bound but never listening: reserves the port (also when 0 asked for one) for the workers.
    reserved = listening_socket(gw.host, gw.port, reuse_port=True)
    port = reserved.getsockname()[1]
    try:
        _WorkerPool(gw.host, port, gw.workers, config, Path(state_dir), run_dir).run()
    finally:
        reserved.close()
        _clear_serving(run_dir)
        shutil.rmtree(state_dir, ignore_errors=True)


def _write_serving(run_dir: RunDir, port: int, workers: list[int]) -> None:
    """``gateway.json``: which process to signal (``kiban reload``) and which ones answer."""
    me = ProcessId.of(os.getpid())
    write_json(
        run_dir.root / "gateway.json",
        {
            "pid": os.getpid(),
            "start_ticks": me.start_ticks if me else None,
            "port": port,
            "workers": workers,
            "config": os.environ[CONFIG_ENV],
        },
    )


def _clear_serving(run_dir: RunDir) -> None:
    path = run_dir.root / "gateway.json"
    try:
        if json.loads(path.read_text()).get("pid") == os.getpid():
            path.unlink()
    except (OSError, ValueError):
        pass


class _WorkerPool:
    """N worker processes on one port; restarts the ones that die until told to stop."""

    def __init__(
        self,
        host: str,
        port: int,
        count: int,
        config: KibanConfig,
        state_dir: Path,
        run_dir: RunDir,
    ) -> None:
        self.snapshot = state_dir / "config.yaml"
        self.snapshot.write_bytes(Path(os.environ[CONFIG_ENV]).read_bytes())
        self.source = os.environ[CONFIG_ENV]
        self.env = os.environ | {
            "KIBAN_WORKER_HOST": host,
            "KIBAN_WORKER_PORT": str(port),
            CONFIG_ENV: str(self.snapshot),
        }
        self.port = port
        self.count = count
        self.grace_s = config.gateway.shutdown_grace_s + _PARENT_GRACE_EXTRA_S
        self.run_dir = run_dir
        self.workers: list[subprocess.Popen[bytes]] = []
        self.stopping = False
        self.reload_requested = False

    def _spawn(self) -> subprocess.Popen[bytes]:
        # A process group of its own: a terminal's Ctrl+C reaches the parent only, which
        # passes it on once (a second SIGINT would make uvicorn skip the graceful stop).
        argv = [sys.executable, "-m", "kiban.gateway.server"]
        return subprocess.Popen(argv, env=self.env, process_group=0)

    def _on_signal(self, signum: int, _frame: object) -> None:
        self.stopping = True
        for worker in self.workers:
            if worker.poll() is None:
                worker.send_signal(signum)

    def _on_hangup(self, _signum: int, _frame: object) -> None:
        self.reload_requested = True

    def _reload(self) -> None:
        """Check the configuration file; if valid, keep a copy and have every worker reload."""
        self.reload_requested = False
        try:
            text = Path(self.source).read_bytes()
            load_serving_config(self.source)
        except (ConfigError, OSError) as err:
            problems = err.problems if isinstance(err, ConfigError) else [str(err)]
            for problem in problems:
                log.error("reload rejected: %s", problem)
            log.error("reload rejected; the workers keep the previous configuration")
            write_json(
                self.run_dir.root / "reload" / f"{os.getpid()}.json",
                {"pid": os.getpid(), "ok": False, "problems": problems, "at": time.time()},
            )
            return
        write_atomically(self.snapshot, text)
        log.info("configuration valid; reloading %d workers", len(self.workers))
        for worker in self.workers:
            if worker.poll() is None:
                worker.send_signal(signal.SIGHUP)

    def run(self) -> None:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        signal.signal(signal.SIGHUP, self._on_hangup)
        self.workers = [self._spawn() for _ in range(self.count)]
        _write_serving(self.run_dir, self.port, [w.pid for w in self.workers])
        log.info("started %d workers: %s", self.count, [w.pid for w in self.workers])
        while not self.stopping:
            if self.reload_requested:
                self._reload()
            for i, worker in enumerate(self.workers):
                code = worker.poll()
                if code is not None and not self.stopping:
                    _mark_dead(worker.pid)
                    log.warning("worker %d exited with %d; restarting", worker.pid, code)
                    time.sleep(_RESTART_DELAY_S)
                    self.workers[i] = self._spawn()
                    _write_serving(self.run_dir, self.port, [w.pid for w in self.workers])
            time.sleep(0.2)
        deadline = time.monotonic() + self.grace_s
        for worker in self.workers:
            try:
                worker.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait()


def _mark_dead(pid: int) -> None:
    """Drop a dead worker's live gauges from the merged metrics."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid)


if __name__ == "__main__":
    run_worker()
