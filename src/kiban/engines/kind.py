"""An engine kind: one engine type's parts, composed.

Each part has one concern and is used by one layer: the :class:`Dialect` by
the gateway (paths, errors, structured output, continuation), the
:class:`Launcher`, images and environments by ``kiban up`` and the renderers,
the :class:`EngineMetrics` and :class:`StartupLog` by observability and the
supervisor, the :class:`KvLayout` by the planner. An engine module builds one
:class:`EngineKind` from its parts and :mod:`kiban.engines` registers it.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from kiban.engines.dialect import Dialect
from kiban.engines.environment import EnvSpec
from kiban.engines.kv_layout import KvLayout
from kiban.engines.launch import ContainerImage, Launcher, LaunchUnsupported
from kiban.engines.telemetry import EngineMetrics, StartupLog

if TYPE_CHECKING:
    from kiban.config import EngineConfig

_VERSION = re.compile(r"^v?(\d+)(?:\.(\d+))?(?:\.(\d+))?")


def parse_version(text: str) -> tuple[int, int, int] | None:
    """``"0.11.2"`` -> ``(0, 11, 2)``; ``"v0.10.2rc1"`` -> ``(0, 10, 2)``; None if not a version."""
    match = _VERSION.match(text.strip())
    if match is None:
        return None
    major, minor, patch = (int(g or 0) for g in match.groups())
    return major, minor, patch


@dataclass(frozen=True)
class EngineOption:
    """An engine-specific key of ``engines[].options``: its accepted values and default."""

    name: str
    choices: tuple[str, ...]
    default: str
    help: str = ""


@dataclass(frozen=True, kw_only=True)
class EngineKind:
    """One engine type. Parts left out mean: kiban cannot do that for this kind."""

    name: str
    dialect: Dialect = field(default_factory=Dialect)
    #: None: kiban cannot start it (the user runs the server and gives its url)
    launcher: Launcher | None = None
    #: the official container image for a device (``gpu``, ``cpu``); None: none known
    image: Callable[[str], ContainerImage] | None = None
    #: the environments :attr:`launcher` runs from, built by ``kiban envs build``
    environments: tuple[EnvSpec, ...] = ()
    metrics: EngineMetrics = field(default_factory=EngineMetrics)
    startup_log: StartupLog = field(default_factory=StartupLog)
    #: None: kiban cannot plan it
    kv: KvLayout | None = None
    #: keys an engine of this kind accepts under ``options``
    options: tuple[EngineOption, ...] = ()

    def launch(self) -> Launcher:
        """The launcher, or :class:`LaunchUnsupported` saying what to do instead."""
        if self.launcher is None:
            raise LaunchUnsupported(
                f"kiban cannot launch {self.name!r} engines; start the server yourself and give "
                "its url (remove the launch section)"
            )
        return self.launcher

    def container_image(self, device: str) -> ContainerImage:
        """The official image for *device*, pinned; :class:`LaunchUnsupported` when none."""
        if self.image is None:
            raise LaunchUnsupported(
                f"kiban knows no official container image for {self.name!r} engines; give one "
                "with launch.image (an image whose command line is launch.command)"
            )
        return self.image(device)

    def option_problems(self, config: EngineConfig) -> list[tuple[str, str]]:
        """``(key, problem)`` for each bad entry of ``options`` (key relative to the engine)."""
        known = {o.name: o for o in self.options}
        problems = []
        for name, value in config.options.items():
            spec = known.get(name)
            if spec is None:
                accepted = ", ".join(known) or "none"
                problems.append(
                    (f"options.{name}", f"unknown option for {self.name}; accepted: {accepted}")
                )
            elif value not in spec.choices:
                problems.append(
                    (
                        f"options.{name}",
                        f"expected one of {', '.join(spec.choices)} (got {value!r})",
                    )
                )
        return problems
