"""Model folders cached under ``$KIBAN_HOME/models``, built once, safe for parallel callers.

`ensure_cached(name, fingerprint, build)` returns ``$KIBAN_HOME/models/<name>``:

- a folder whose marker holds the same fingerprint is reused as it is;
- otherwise ``build`` fills a fresh temporary folder beside it, the marker is
  written last, and the folder is renamed into place: a killed build leaves only
  a ``.<name>.tmp-*`` folder, never a half-made model, swept by the next builder;
- a file lock serialises builders (two pytest workers, a test and ``kiban up``).
"""

from __future__ import annotations

import fcntl
import json
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from kiban.deploy.envs import kiban_home

MARKER = ".kiban-model.json"
Progress = Callable[[str], None]


def models_root() -> Path:
    """``$KIBAN_HOME/models`` (``~/.cache/kiban/models`` by default)."""
    return kiban_home() / "models"


def is_current(folder: Path, fingerprint: str) -> bool:
    """True when *folder* was finished by a build with this fingerprint."""
    try:
        marker = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(marker, dict) and marker.get("fingerprint") == fingerprint


def ensure_cached(
    name: str,
    fingerprint: str,
    build: Callable[[Path, Progress], None],
    *,
    progress: Progress | None = None,
) -> Path:
    """The cached folder *name*, built by ``build(tmp_dir, progress)`` when missing or stale."""
    say = progress or (lambda _msg: None)
    root = models_root()
    folder = root / name
    if is_current(folder, fingerprint):  # the common case: no lock needed to read
        return folder
    root.mkdir(parents=True, exist_ok=True)
    with _locked(root / f".{name}.lock"):
        if is_current(folder, fingerprint):  # another caller built it while we waited
            return folder
        for stale in root.glob(f".{name}.tmp-*"):  # left by a killed build; we hold the lock
            shutil.rmtree(stale, ignore_errors=True)
        started = time.monotonic()
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=root))
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is readable like the envs
        try:
            build(tmp, say)
            seconds = round(time.monotonic() - started, 1)
            marker = {"name": name, "fingerprint": fingerprint, "build_seconds": seconds}
            (tmp / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
            if folder.exists():
                old = folder.rename(root / f".{name}.tmp-old-{time.time_ns()}")
                shutil.rmtree(old, ignore_errors=True)
            tmp.rename(folder)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        say(f"{name}: ready in {seconds} s")
    return folder


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    with path.open("w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
