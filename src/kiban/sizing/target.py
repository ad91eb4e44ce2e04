"""Where one engine is planned to run, and the refusal an engine module raises."""

from __future__ import annotations

from dataclasses import dataclass

from kiban.errors import KibanError
from kiban.sizing.devices import GpuInfo, HostInfo


class PlanRefusal(KibanError):
    """An engine cannot run this model / KV dtype / device; ``reason`` says why.

    ``alternatives`` are settings that would work (other KV dtypes, a backend).
    """

    def __init__(self, reason: str, alternatives: tuple[str, ...] = ()) -> None:
        self.reason = reason
        self.alternatives = alternatives
        hint = f"; use {' or '.join(alternatives)}" if alternatives else ""
        super().__init__(reason + hint)


@dataclass(frozen=True)
class PlanTarget:
    """The device one engine runs on: a GPU (``tp`` of them, alike) or the host's memory.

    ``args`` are the user's ``launch.args``, for engines whose refusals depend on them.
    """

    device: str
    host: HostInfo
    gpu: GpuInfo | None = None
    tp: int = 1
    args: tuple[str, ...] = ()

    def arg_value(self, *names: str) -> str | None:
        """The value the user's launch.args give the flag *names* (``-x V`` or ``--x=V``)."""
        for i, arg in enumerate(self.args):
            flag, eq, inline = arg.partition("=")
            if flag in names:
                if eq:
                    return inline
                return self.args[i + 1] if i + 1 < len(self.args) else ""
        return None

    @property
    def on_gpu(self) -> bool:
        return self.device == "gpu"

    @property
    def total_bytes(self) -> int:
        """Memory of one of the engine's GPUs, or the host's total memory."""
        return self.gpu.memory_bytes if self.gpu is not None else self.host.memory_bytes

    @property
    def name(self) -> str:
        return self.gpu.name if self.gpu is not None else "host memory (CPU engine)"

    @property
    def fp8_capable(self) -> bool | None:
        """FP8 KV support of the hardware: sm89+ GPUs; AVX-512/AMX CPUs (vLLM CPU)."""
        if self.gpu is not None:
            return self.gpu.supports_fp8
        return self.host.has_avx512_or_amx
