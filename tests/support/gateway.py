"""Run the real kiban gateway (`kiban serve`) as a subprocess for tests."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.error
import urllib.request
from email.message import Message
from pathlib import Path
from typing import Any

import yaml

from tests.support.engines import EngineProcess, free_port

KIBAN = Path(sys.executable).with_name("kiban")
REPO_ROOT = Path(__file__).resolve().parents[2]


def add_key(keys_file: Path, name: str, *args: str) -> str:
    """`kiban keys add NAME ARGS --file KEYS_FILE`; returns the key it printed."""
    done = subprocess.run(
        [str(KIBAN), "keys", "add", name, "--file", str(keys_file), *args],
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout.strip()


def gateway_process(
    config: dict[str, Any],
    work_dir: Path,
    *,
    workers: int = 1,
    env: dict[str, str] | None = None,
    name: str = "kiban",
) -> EngineProcess:
    """An (unstarted) `kiban serve` on a free port for *config* (written to *work_dir*)."""
    port = free_port()
    work_dir.mkdir(parents=True, exist_ok=True)
    config_path = work_dir / f"{name}.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    argv = [
        str(KIBAN),
        "serve",
        "-c",
        str(config_path),
        "--port",
        str(port),
        "--workers",
        str(workers),
    ]
    return EngineProcess(
        name=name, argv=argv, port=port, log_path=work_dir / f"{name}.log", env=env or {}
    )


def fault_upstream(log_dir: Path, *, slow_interval: float = 1.0) -> EngineProcess:
    """An (unstarted) fault-injecting upstream (tests/support/fault_upstream.py)."""
    port = free_port()
    argv = [
        sys.executable,
        "-m",
        "tests.support.fault_upstream",
        "--port",
        str(port),
        "--slow-interval",
        str(slow_interval),
    ]
    return EngineProcess(
        name="fault-upstream",
        argv=argv,
        port=port,
        log_path=log_dir / f"fault-{port}.log",
        env={"PYTHONPATH": str(REPO_ROOT)},
    )


def chat_exchange(
    base_url: str, body: dict[str, Any], timeout: float = 120
) -> tuple[int, Message, dict[str, Any]]:
    """Status, headers and JSON body of one POST /v1/chat/completions, errors included."""
    request = urllib.request.Request(
        f"{base_url}/v1/chat/completions",
        data=json.dumps(body).encode(),
        headers={"content-type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            return resp.status, resp.headers, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, err.headers, json.loads(err.read())
