"""How kiban starts an engine: its environment, command line and variables, and its image.

An engine kind that kiban can start has a :class:`Launcher`; one it cannot
(a server the user runs) has none. Container images are their own part
(:class:`ContainerImage`, per device), used by ``kiban compose`` and
``kiban render k8s``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from kiban.errors import KibanError

if TYPE_CHECKING:
    from kiban.config import EngineConfig


class LaunchUnsupported(KibanError):
    """kiban cannot start this engine kind (or not on this device); the message says why."""


@dataclass(frozen=True)
class LaunchTarget:
    """Where a managed engine runs: its environment's root, and the address to listen on."""

    env_root: Path | None  # None for engines that run from the system (kind openai)
    host: str
    port: int

    def program(self, name: str) -> str:
        """Path of an executable in the engine's environment (``bin/<name>``)."""
        if self.env_root is None:
            raise LaunchUnsupported(f"no engine environment to run {name!r} from")
        return str(self.env_root / "bin" / name)


@dataclass(frozen=True)
class ContainerTarget(LaunchTarget):
    """A launch inside a container: programs come from the image, not an environment."""

    programs: dict[str, str] = field(default_factory=dict)

    def program(self, name: str) -> str:
        return self.programs.get(name, name)


class Launcher(ABC):
    """The engine's own server command and what it needs to run."""

    #: launched from a user-given ``launch.command`` instead of a command kiban knows
    takes_command: ClassVar[bool] = False

    @abstractmethod
    def environment(self, device: str) -> str | None:
        """The engine environment (kiban.deploy.envs) this kind runs from on *device*.

        None: the command runs as given, from the system (no environment to build).
        Raises :class:`LaunchUnsupported` for a device the engine cannot run on.
        """

    @abstractmethod
    def argv(self, engine: EngineConfig, target: LaunchTarget) -> list[str]:
        """The engine's own server command: model, served names, address (no tuning flags).

        The supervisor appends the planner's flags and then ``launch.args``.
        """

    def env(self, engine: EngineConfig) -> dict[str, str]:
        """Environment variables the engine needs besides the device selection."""
        return {}

    def structured_args(self, engine: EngineConfig) -> list[str]:
        """Server flags that make structured output safe (backend, whitespace limit)."""
        return []


@dataclass(frozen=True)
class ContainerImage:
    """An engine's official image, pinned, and what kiban's command needs to run in it.

    ``programs`` maps a program name of `Launcher.argv` (``python``,
    ``llama-server``, ...) to what runs it inside the image; kiban sets the
    container's entrypoint to its own command line, so the image's own
    ENTRYPOINT does not matter. ``health_tool``: an HTTP client in the image
    (Compose healthchecks). ``ipc_host``: the engine's docs run it with
    ``--ipc=host`` (PyTorch shares tensors through /dev/shm); ``shm_size``:
    the shared memory to give it where that cannot be shared (Kubernetes).
    ``source`` names the files these facts were read from.
    """

    image: str
    programs: dict[str, str] = field(default_factory=dict)
    health_tool: tuple[str, ...] = ("curl", "-fsS", "-o", "/dev/null")
    ipc_host: bool = False
    shm_size: str | None = None
    ulimits: dict[str, int | dict[str, int]] = field(default_factory=dict)
    source: str = ""
