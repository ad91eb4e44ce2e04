"""A kiban gateway in front of one engine, scraped by Debian's Prometheus.

The configuration is written with `gateway` and `observability` settings for one
engine and one route, rendered by `kiban observability render`; the gateway and
Prometheus (own port, own data dir, 1 h retention) are started, and both are stopped
in ``finally``, Prometheus first.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tests.support.engines import EngineProcess, free_port
from tests.support.promtool import binary

KIBAN = str(Path(sys.executable).parent / "kiban")


@dataclass
class ObservedStack:
    config: Path
    gateway: EngineProcess
    prometheus: EngineProcess
    rendered: Path  # what `kiban observability render` wrote


@contextmanager
def observed_stack(
    root: Path, engine: dict[str, Any], observability: dict[str, Any] | None = None
) -> Iterator[ObservedStack]:
    """Gateway + Prometheus for *engine* (an `engines[]` entry), served as model ``tiny``."""
    gateway_port, prom_port = free_port(), free_port()
    config = root / "kiban.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "gateway": {"port": gateway_port, "health_interval_s": 1, "request_log": False},
                "observability": {
                    "prometheus_url": f"http://127.0.0.1:{prom_port}",
                    "scrape_interval_s": 1,
                    **(observability or {}),
                },
                "engines": [engine],
                "routes": [{"model": "tiny", "engines": [engine["name"]]}],
            }
        )
    )
    rendered = root / "rendered"
    subprocess.run(
        [KIBAN, "observability", "render", "-c", str(config), "-o", str(rendered)],
        check=True,
        capture_output=True,
    )
    gateway = EngineProcess(
        name="kiban gateway",
        argv=[KIBAN, "serve", "-c", str(config)],
        port=gateway_port,
        log_path=root / "gateway.log",
        health_path="/ready",
    )
    prometheus = EngineProcess(
        name="prometheus",
        argv=[
            binary("prometheus"),
            f"--config.file={rendered / 'prometheus' / 'prometheus.yml'}",
            f"--storage.tsdb.path={root / 'prometheus-data'}",
            f"--web.listen-address=127.0.0.1:{prom_port}",
            "--storage.tsdb.retention.time=1h",
        ],
        port=prom_port,
        log_path=root / "prometheus.log",
        health_path="/-/ready",
    )
    gateway.start(timeout=60)
    try:
        prometheus.start(timeout=60)
        try:
            yield ObservedStack(config, gateway, prometheus, rendered)
        finally:
            assert prometheus.stop() == 0, prometheus.log_tail()
    finally:
        gateway.stop()
