"""Memory sizes: parse ``24GiB`` / ``24 GB`` / ``80G`` and print bytes for people."""

from __future__ import annotations

import re

KiB = 1024
MiB = 1024**2
GiB = 1024**3

_UNITS = {
    "": 1,
    "b": 1,
    "k": KiB,
    "kib": KiB,
    "kb": 1000,
    "m": MiB,
    "mib": MiB,
    "mb": 1000**2,
    "g": GiB,
    "gib": GiB,
    "gb": 1000**3,
    "t": 1024**4,
    "tib": 1024**4,
    "tb": 1000**4,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")

SIZE_FORMS = "a number of bytes or a size such as 24GiB, 24GB, 16G, 500MiB"


def parse_size(text: str | int | float) -> int:
    """Bytes in *text*; ``G``/``GiB`` are binary, ``GB`` decimal. ValueError names the forms."""
    if isinstance(text, int | float) and not isinstance(text, bool):
        if text < 0:
            raise ValueError(f"expected {SIZE_FORMS}")
        return int(text)
    match = _SIZE.match(str(text))
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise ValueError(f"expected {SIZE_FORMS}")
    return int(float(match.group(1)) * _UNITS[unit])


def gib(n_bytes: float) -> str:
    """``12.34 GiB``."""
    return f"{n_bytes / GiB:.2f} GiB"


def human(n_bytes: float) -> str:
    """The largest binary unit that keeps the number at or above 1 (``1.50 MiB``)."""
    sign = "-" if n_bytes < 0 else ""
    value = abs(n_bytes)
    for unit, size in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if value >= size:
            return f"{sign}{value / size:.2f} {unit}"
    return f"{sign}{int(value)} B"
