"""What an engine's isolated environment holds, as data: pinned build steps.

Each engine module declares the environments it runs from (:class:`EnvSpec`);
:mod:`kiban.deploy.envs` builds them. The fingerprint of a spec decides
whether a built environment is current, so the fields here are its format.
"""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import asdict, dataclass, field


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
