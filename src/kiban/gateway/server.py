"""Running the gateway: uvicorn (uvloop + httptools), one or several worker processes."""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

import uvicorn

from kiban.config import KibanConfig, load_config
from kiban.gateway.app import Gateway

CONFIG_ENV = "KIBAN_CONFIG"
OVERRIDES_ENV = "KIBAN_GATEWAY_OVERRIDES"


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
    configure_logging(os.environ.get("KIBAN_LOG_LEVEL", "info"))
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


def serve(
    config_path: Path, config: KibanConfig, overrides: dict[str, object], log_level: str = "info"
) -> None:
    """Serve until interrupted. *config* is validated, with *overrides* of ``gateway`` applied."""
    gw = config.gateway
    os.environ[CONFIG_ENV] = str(config_path.resolve())
    os.environ[OVERRIDES_ENV] = json.dumps(overrides)
    os.environ["KIBAN_LOG_LEVEL"] = log_level
    metrics_dir = None
    if gw.workers > 1:
        metrics_dir = tempfile.mkdtemp(prefix="kiban-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    try:
        uvicorn.run(
            "kiban.gateway.server:app_factory",
            factory=True,
            host=gw.host,
            port=gw.port,
            workers=gw.workers,
            loop="uvloop",
            http="httptools",
            lifespan="on",
            access_log=False,
            log_level=log_level,
            timeout_graceful_shutdown=30,
        )
    finally:
        if metrics_dir:
            shutil.rmtree(metrics_dir, ignore_errors=True)
