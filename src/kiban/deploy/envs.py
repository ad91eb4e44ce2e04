"""Isolated, pinned virtual environments for inference engines.

Each engine kind gets its own venv under ``$KIBAN_HOME/envs/<name>`` (KIBAN_HOME
defaults to ``~/.cache/kiban``), so engine dependencies (torch, transformers, ...)
never meet kiban's own. An environment is *data*: an `EnvSpec` holding a list of
`Step` command lines, declared by its engine module (`EngineKind.environments`),
so a new engine needs no code path here. llama.cpp's `llama-server` is built
from source into its env (`kiban.engines.llamacpp.llamacpp_spec`); the venv's
pip fetches the source.

A marker file records the fingerprint of the spec that built a venv:

* marker matches the spec  -> the venv is reused as is (no pip call at all);
* marker differs           -> the venv is deleted and built again;
* venv without marker      -> an install that did not finish (or one started by
  hand): wait for any process still running in it, then run the steps in place
  (pip is idempotent); if that fails, build from scratch once.

A build that fails (a step exits non-zero: no network, a compiler error) removes
the venv it made, so nothing half-made is left to be mistaken for an engine; the
install log beside it stays, and the error names the step and ends with the log's
last lines. An interrupted build (killed, Ctrl+C) keeps its venv to resume.

A file lock serialises concurrent callers (two pytest workers, two CLIs).
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass
from pathlib import Path

from kiban.engines import ENGINE_KINDS
from kiban.engines.environment import EnvSpec, Step
from kiban.errors import KibanError

MARKER = ".kiban-env.json"
LOCAL_WHEELS = Path("/opt/wheels")
TAIL_LINES = 40

Progress = Callable[[str], None]


#: every engine kind's environments, by name
ENGINE_ENVS: dict[str, EnvSpec] = {
    spec.name: spec for kind in ENGINE_KINDS.values() for spec in kind.environments
}


class EnvInstallError(KibanError, RuntimeError):
    """A build step failed; the message names the step and ends with its output tail."""

    exit_code = 1


@dataclass(frozen=True)
class EngineEnv:
    """A ready engine venv."""

    name: str
    root: Path
    python: Path


def kiban_home() -> Path:
    """``$KIBAN_HOME`` or ``~/.cache/kiban``."""
    return Path(os.environ.get("KIBAN_HOME") or Path.home() / ".cache" / "kiban")


def env_root(name: str) -> Path:
    """Where the venv named `name` lives."""
    return kiban_home() / "envs" / name


def ensure_engine_env(name: str, *, progress: Progress | None = None) -> EngineEnv:
    """Return the venv for engine kind `name`, building or repairing it when needed."""
    spec = ENGINE_ENVS.get(name)
    if spec is None:
        raise KeyError(f"unknown engine env {name!r}; known: {sorted(ENGINE_ENVS)}")
    say = progress or (lambda _msg: None)
    root = env_root(name)
    root.parent.mkdir(parents=True, exist_ok=True)
    with _locked(root.parent / f".{name}.lock"):
        state = marker_state(root, spec)
        if state == "current":
            return _engine_env(spec, root)
        if state == "stale":
            say(f"{name}: spec changed, rebuilding {root}")
            shutil.rmtree(root)
        elif state == "unfinished":
            _wait_for_foreign_install(root, say)
            try:
                return _build(spec, root, say, fresh=False)
            except EnvInstallError as exc:
                say(f"{name}: resuming failed ({exc.args[0].splitlines()[0]}); starting over")
                shutil.rmtree(root)
        try:
            return _build(spec, root, say, fresh=True)
        except EnvInstallError as exc:
            shutil.rmtree(root, ignore_errors=True)
            message = f"{exc.args[0]}\n(the unfinished environment {root} was removed)"
            raise EnvInstallError(message) from None


def llama_server_binary(env: EngineEnv) -> Path:
    """The ``llama-server`` executable of a llama.cpp env (``llamacpp-cpu``, ``-cuda``)."""
    return env.root / "bin" / "llama-server"


def _engine_env(spec: EnvSpec, root: Path) -> EngineEnv:
    return EngineEnv(name=spec.name, root=root, python=root / "bin" / "python")


def marker_state(root: Path, spec: EnvSpec) -> str:
    """One of: "missing", "unfinished", "stale", "current"."""
    if not (root / "bin" / "python").exists():
        return "stale" if root.exists() else "missing"
    try:
        marker = json.loads((root / MARKER).read_text())
    except (OSError, ValueError):
        return "unfinished"
    return "current" if marker.get("fingerprint") == spec.fingerprint() else "stale"


def _build(spec: EnvSpec, root: Path, say: Progress, *, fresh: bool) -> EngineEnv:
    started = time.monotonic()
    if fresh:
        say(f"{spec.name}: creating venv {root}")
        _run(spec, Step("python -m venv", (sys.executable, "-m", "venv", str(root))), root, say)
    (root / MARKER).unlink(missing_ok=True)
    for step in spec.steps:
        say(f"{spec.name}: {step.label}")
        _run(spec, step, root, say)
    env = _engine_env(spec, root)
    _smoke_test(spec, env, say)
    seconds = round(time.monotonic() - started, 1)
    marker = {
        "name": spec.name,
        "fingerprint": spec.fingerprint(),
        "spec": asdict(spec),
        "built_at": time.time(),
        "build_seconds": seconds,
    }
    (root / MARKER).write_text(json.dumps(marker, indent=2, sort_keys=True) + "\n")
    say(f"{spec.name}: ready in {seconds}s")
    return env


def _expand(argv: tuple[str, ...], root: Path) -> list[str]:
    values = {
        "python": str(root / "bin" / "python"),
        "root": str(root),
        "jobs": str(len(os.sched_getaffinity(0))),
    }
    out: list[str] = []
    for arg in argv:
        if arg == "{pip_extra}":
            out += ["--find-links", str(LOCAL_WHEELS)] if LOCAL_WHEELS.is_dir() else []
        else:
            out.append(arg.format(**values))
    return out


def _run(spec: EnvSpec, step: Step, root: Path, say: Progress) -> None:
    """Run one step, log its output beside the venv, raise with the tail on failure."""
    argv = _expand(step.argv, root)
    log = root.parent / f"{spec.name}.install.log"
    tail: deque[str] = deque(maxlen=TAIL_LINES)
    env = os.environ | {"PIP_PROGRESS_BAR": "off", **spec.env}
    with log.open("a", encoding="utf-8") as fh:
        fh.write(f"\n$ {' '.join(argv)}\n")
        proc = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            start_new_session=True,  # its own group: a build's compilers go with it
        )
        assert proc.stdout is not None
        shown = None
        try:
            for line in proc.stdout:
                fh.write(line)
                tail.append(line.rstrip("\n"))
                match = re.search(step.progress, line) if step.progress else None
                if match and match.group(1) != shown:
                    shown = match.group(1)
                    say(f"{spec.name}: {step.label}: {shown}")
            code = proc.wait()
        except BaseException:
            # interrupted (Ctrl-C, a test's timeout): end the step and all it started, so that
            # no orphaned build writes into the environment while the next attempt runs
            _end_group(proc)
            raise
    if code not in step.ok_codes:
        raise EnvInstallError(
            f"{spec.name}: step '{step.label}' failed with exit code {code} "
            f"(full log: {log})\n--- last {len(tail)} lines ---\n" + "\n".join(tail)
        )


def _end_group(proc: subprocess.Popen[str]) -> None:
    """SIGTERM a step's process group, SIGKILL it after 10 s, and reap the step."""
    for sig, wait_s in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        with suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def _smoke_test(spec: EnvSpec, env: EngineEnv, say: Progress) -> None:
    for module in spec.smoke_imports:
        say(f"{spec.name}: import {module}")
        step = Step(f"import {module}", ("{python}", "-c", f"import {module}"))
        _run(spec, step, env.root, say)


def _processes_using(root: Path) -> Iterator[int]:
    """PIDs of pip processes whose command line mentions `root` (e.g. started by hand)."""
    needle = str(root).encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            if needle in cmdline and b"pip" in cmdline:
                yield int(entry.name)
        except OSError:
            continue


def _wait_for_foreign_install(root: Path, say: Progress, timeout: float = 3600) -> None:
    """Wait while another process still installs into `root` (one install at a time)."""
    deadline = time.monotonic() + timeout
    while pids := list(_processes_using(root)):
        if time.monotonic() > deadline:
            raise EnvInstallError(f"processes {pids} still use {root} after {timeout}s")
        say(f"waiting for processes {pids} that use {root}")
        time.sleep(5)


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    with path.open("w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
