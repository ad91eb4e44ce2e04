"""Running the gateway: uvicorn (uvloop + httptools), one process or N worker processes.

With ``--workers N`` every worker binds its own listening socket with
``SO_REUSEPORT``, so the kernel spreads new connections evenly over them (a
shared accept socket lets one idle worker win most connections). The parent
process only supervises: it restarts a worker that dies and passes SIGTERM /
SIGINT on for a graceful stop. Metrics of all workers are merged through
prometheus_client's multiprocess directory, so /metrics shows one view
whichever worker answers.
"""

from __future__ import annotations

import json
import logging
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

from kiban.config import KibanConfig, load_config
from kiban.gateway.app import Gateway

CONFIG_ENV = "KIBAN_CONFIG"
OVERRIDES_ENV = "KIBAN_GATEWAY_OVERRIDES"
LOG_LEVEL_ENV = "KIBAN_LOG_LEVEL"
GRACEFUL_SHUTDOWN_S = 30
_RESTART_DELAY_S = 1.0

log = logging.getLogger("kiban.server")


def configure_logging(level: str = "info") -> None:
    """kiban's own log lines go to stderr; access lines are one JSON object each."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    access = logging.getLogger("kiban.access")
    access.handlers[:] = [handler]
    access.propagate = False
    access.setLevel(logging.INFO)
    other = logging.StreamHandler(sys.stderr)
    other.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("kiban")
    root.handlers[:] = [other]
    root.setLevel(level.upper())


def app_factory() -> Gateway:
    """Build the gateway in a worker process from the config path in the environment."""
    configure_logging(os.environ.get(LOG_LEVEL_ENV, "info"))
    config = load_config(os.environ[CONFIG_ENV])
    overrides = json.loads(os.environ.get(OVERRIDES_ENV) or "{}")
    if overrides:
        gateway = config.gateway.model_copy(update=overrides)
        config = config.model_copy(update={"gateway": gateway})
    app = Gateway(config)
    if config.observability.gpu_exporter == "gateway":
        add_gpu_collector(app, watch_xid=config.gateway.workers == 1)
    return app


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


def _uvicorn_config(log_level: str) -> uvicorn.Config:
    return uvicorn.Config(
        "kiban.gateway.server:app_factory",
        factory=True,
        loop="uvloop",
        http="httptools",
        lifespan="on",
        access_log=False,
        log_level=log_level,
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
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
    _exit_with_parent()
    host, port = os.environ["KIBAN_WORKER_HOST"], int(os.environ["KIBAN_WORKER_PORT"])
    sock = listening_socket(host, port, reuse_port=True)
    sock.listen(2048)
    server = uvicorn.Server(_uvicorn_config(os.environ.get(LOG_LEVEL_ENV, "info")))
    server.run(sockets=[sock])


def serve(
    config_path: Path, config: KibanConfig, overrides: dict[str, object], log_level: str = "info"
) -> None:
    """Serve until interrupted. *config* is validated, with *overrides* of ``gateway`` applied."""
    gw = config.gateway
    os.environ[CONFIG_ENV] = str(config_path.resolve())
    os.environ[OVERRIDES_ENV] = json.dumps(overrides)
    os.environ[LOG_LEVEL_ENV] = log_level
    if gw.workers == 1:
        sock = listening_socket(gw.host, gw.port, reuse_port=False)
        sock.listen(2048)
        uvicorn.Server(_uvicorn_config(log_level)).run(sockets=[sock])
        return
    configure_logging(log_level)
    metrics_dir = tempfile.mkdtemp(prefix="kiban-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    # Bound but never listening: reserves the port (also when 0 asked for one) for the workers.
    reserved = listening_socket(gw.host, gw.port, reuse_port=True)
    port = reserved.getsockname()[1]
    try:
        _WorkerPool(gw.host, port, gw.workers).run()
    finally:
        reserved.close()
        shutil.rmtree(metrics_dir, ignore_errors=True)


class _WorkerPool:
    """N worker processes on one port; restarts the ones that die until told to stop."""

    def __init__(self, host: str, port: int, count: int) -> None:
        self.env = os.environ | {"KIBAN_WORKER_HOST": host, "KIBAN_WORKER_PORT": str(port)}
        self.count = count
        self.workers: list[subprocess.Popen[bytes]] = []
        self.stopping = False

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

    def run(self) -> None:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        self.workers = [self._spawn() for _ in range(self.count)]
        log.info("started %d workers: %s", self.count, [w.pid for w in self.workers])
        while not self.stopping:
            for i, worker in enumerate(self.workers):
                code = worker.poll()
                if code is not None and not self.stopping:
                    _mark_dead(worker.pid)
                    log.warning("worker %d exited with %d; restarting", worker.pid, code)
                    time.sleep(_RESTART_DELAY_S)
                    self.workers[i] = self._spawn()
            time.sleep(0.2)
        deadline = time.monotonic() + GRACEFUL_SHUTDOWN_S + 5
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
