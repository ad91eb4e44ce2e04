"""`kiban doctor` on this machine (no GPU, Docker CLI without a daemon or none at all)."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import yaml

from tests.support.cli import kiban
from tests.support.engines import free_port


def test_doctor_reports_machine_and_config(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        busy_port = busy.getsockname()[1]
        free = free_port()
        config = {
            "gateway": {"port": busy_port},
            "engines": [
                {
                    "name": "v",
                    "kind": "vllm",
                    "models": ["m"],
                    "launch": {"model": str(tmp_path / "missing"), "device": "cpu", "port": free},
                }
            ],
            "routes": [{"model": "m", "engines": ["v"]}],
        }
        path = tmp_path / "kiban.yaml"
        path.write_text(yaml.safe_dump(config))
        result = kiban("doctor", "-c", str(path), "--json")
    findings = json.loads(result.stdout)
    by_area: dict[str, list[dict]] = {}
    for f in findings:
        by_area.setdefault(f["area"], []).append(f)
    assert result.returncode == 1  # the missing model is a failure
    assert by_area["python"][0]["status"] == "ok"
    gpu = by_area["gpu"][0]
    assert gpu["status"] == "warn" and "libnvidia-ml.so.1 not found" in gpu["detail"]
    engine = {f["detail"]: f["status"] for f in by_area["engine v"]}
    assert engine[f"launch.model {tmp_path / 'missing'} does not exist"] == "fail"
    assert engine[f"port {free} is free"] == "ok"
    assert by_area["gateway"] == [
        {
            "area": "gateway",
            "status": "warn",
            "detail": f"port {busy_port} is in use",
            "fix": by_area["gateway"][0]["fix"],
        }
    ]
    assert "docker" in by_area
