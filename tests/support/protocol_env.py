"""A venv holding lmdeploy's and SGLang's own request models, for checking kiban's dialects.

Neither engine runs without a GPU, and their packages pull in torch; installed
with ``--no-deps`` beside the few libraries their protocol modules import,
those modules load, and kiban's translated request bodies can be checked
against the engines' own pydantic classes and sampling-parameter code.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from kiban.deploy.envs import ENGINE_ENVS, EngineEnv, ensure_engine_env
from kiban.engines.environment import EnvSpec, Step, pip_install
from kiban.engines.lmdeploy import PINNED_VERSION as LMDEPLOY_VERSION
from kiban.engines.sglang import PINNED_VERSION as SGLANG_VERSION

CHECK_SCRIPT = Path(__file__).with_name("protocol_check.py")


def _no_deps(*requirements: str) -> Step:
    argv = ("{python}", "-m", "pip", "install", "{pip_extra}", "--no-deps", *requirements)
    return Step(f"pip install --no-deps {' '.join(requirements)}", argv)


PROTOCOL_ENV = EnvSpec(
    name="structured-protocols",
    steps=(
        _no_deps(f"lmdeploy=={LMDEPLOY_VERSION}", f"sglang=={SGLANG_VERSION}"),
        # what lmdeploy/serve/openai/protocol.py and sglang/srt/entrypoints/openai/protocol.py
        # (with sglang/utils.py) import
        pip_install(
            "pydantic==2.13.4",
            "shortuuid==1.0.13",
            "openai==3.57.0",
            "msgspec==0.22.0",
            "numpy==2.4.6",
            "pybase64==1.5.1",
            "requests==2.34.2",
            "tqdm==4.70.1",
            "ipython==9.18.1",
        ),
    ),
)


def protocol_env() -> EngineEnv:
    ENGINE_ENVS.setdefault(PROTOCOL_ENV.name, PROTOCOL_ENV)
    return ensure_engine_env(PROTOCOL_ENV.name, progress=print)


def check_in_engine_env(env: EngineEnv, engine: str, body_json: str) -> str:
    """Run protocol_check.py in *env*; returns its stdout (a JSON report)."""
    proc = subprocess.run(
        [str(env.python), str(CHECK_SCRIPT), engine],
        input=body_json,
        capture_output=True,
        text=True,
        timeout=120,
    )
    if proc.returncode != 0:
        raise AssertionError(f"{engine} rejected the request:\n{proc.stderr[-4000:]}")
    return proc.stdout
