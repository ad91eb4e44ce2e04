"""`python -m kiban.healthcheck`, the gateway image's HEALTHCHECK, against real HTTP."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from kiban.healthcheck import check


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        status = int(self.path.strip("/"))
        self.send_response(status)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    thread.join(timeout=5)


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_statuses(server):
    assert check(f"{server}/200") is None
    assert check(f"{server}/204") is None
    assert check(f"{server}/503") == f"{server}/503: HTTP 503"
    refused = check(f"http://127.0.0.1:{_closed_port()}/health")
    assert refused is not None and "refused" in refused.lower()


def test_exit_codes_of_the_module(server):
    def run(*args: str, env: dict[str, str] | None = None) -> int:
        return subprocess.run(
            [sys.executable, "-m", "kiban.healthcheck", *args], env=env, timeout=30, check=False
        ).returncode

    assert run(f"{server}/200") == 0
    assert run(f"{server}/500") == 1
    assert run(env={"KIBAN_HEALTH_URL": f"{server}/200"}) == 0
