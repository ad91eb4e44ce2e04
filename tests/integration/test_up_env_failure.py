"""`kiban up` on a machine where an engine's environment cannot be built (no network).

The package index is a closed port on loopback, so the llama.cpp environment's
first real step (pip downloading the pinned llama-cpp-python sdist) fails the way
it does on a machine without network. `kiban up` must end with a clear error
naming the engine, the step and the end of the install log, start nothing, and
leave no half-made environment behind.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import yaml

from tests.support.engines import free_port
from tests.support.gateway import KIBAN, REPO_ROOT

STEP = "pip download llama-cpp-python==0.3.36 (sdist)"


def test_failed_environment_build_is_a_clear_error_and_leaves_nothing(
    tiny_gguf: Path, tmp_path: Path
) -> None:
    home = tmp_path / "home"
    config = {
        "gateway": {"port": free_port()},
        "engines": [
            {
                "name": "llama",
                "kind": "llamacpp",
                "models": ["tiny"],
                "launch": {
                    "model": str(tiny_gguf),
                    "device": "cpu",
                    "port": free_port(),
                    "context": 512,
                    "concurrency": 1,
                },
            }
        ],
        "routes": [{"model": "tiny", "engines": ["llama"]}],
    }
    path = tmp_path / "kiban.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    offline = {
        "KIBAN_HOME": str(home),
        "PIP_CONFIG_FILE": os.devnull,  # no configured mirrors or local indexes
        "PIP_INDEX_URL": f"http://127.0.0.1:{free_port()}/simple/",  # nothing listens
        "PIP_EXTRA_INDEX_URL": "",
        "PIP_FIND_LINKS": "",
        "PIP_RETRIES": "0",
        "PIP_TIMEOUT": "5",
    }
    result = subprocess.run(
        [str(KIBAN), "up", "-c", str(path)],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=REPO_ROOT,
        env=os.environ | offline,
    )
    said = result.stdout + result.stderr
    assert result.returncode == 1, said
    assert "Traceback" not in said
    assert "kiban up failed" in said
    assert "engine 'llama': building its environment failed" in said
    assert f"step '{STEP}' failed with exit code" in said
    # the end of the install log: pip's own words about the unreachable index
    assert "llama-cpp-python" in said.split("--- last", 1)[1]
    root = home / "envs" / "llamacpp-cpu"
    assert not root.exists(), "the half-made environment was left behind"
    assert f"the unfinished environment {root} was removed" in said
    log = home / "envs" / "llamacpp-cpu.install.log"
    assert log.is_file() and STEP.split(" (")[0].split()[-1] in log.read_text()
    # nothing started: kiban is not up for this configuration
    status = subprocess.run(
        [str(KIBAN), "status", "-c", str(path)], capture_output=True, text=True, timeout=60
    )
    assert status.returncode == 1 and "not up" in status.stderr + status.stdout
