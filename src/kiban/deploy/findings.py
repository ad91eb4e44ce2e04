"""What `kiban doctor`'s checks report: one finding, and what to do when it is not ok."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Status = Literal["ok", "warn", "fail", "info"]


@dataclass(frozen=True)
class Finding:
    area: str
    status: Status
    detail: str
    fix: str = ""
