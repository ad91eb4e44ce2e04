"""A real kiban gateway (uvicorn + uvloop + httptools) on a free loopback port, in a thread."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import uvicorn

from kiban.config import parse_config
from kiban.gateway.app import Gateway
from tests.support.engines import free_port


@contextmanager
def running_gateway(raw_config: dict[str, Any], timeout: float = 30.0) -> Iterator[Gateway]:
    """Serve *raw_config* (a kiban.yaml tree) until the block ends; yields the Gateway.

    ``gateway.base_url`` is set to ``http://127.0.0.1:PORT``.
    """
    port = free_port()
    raw = {**raw_config, "gateway": {**raw_config.get("gateway", {}), "port": port}}
    gateway = Gateway(parse_config(raw, env={}), keys=[])
    server = uvicorn.Server(
        uvicorn.Config(
            gateway,
            host="127.0.0.1",
            port=port,
            loop="uvloop",
            http="httptools",
            lifespan="on",
            access_log=False,
            log_level="warning",
        )
    )
    thread = threading.Thread(target=server.run, name=f"kiban-gateway-{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"kiban gateway did not start on port {port}")
        time.sleep(0.05)
    gateway.base_url = f"http://127.0.0.1:{port}"  # type: ignore[attr-defined]
    try:
        yield gateway
    finally:
        server.should_exit = True
        thread.join(timeout)
