"""Exact weight sizes from the files' own headers; tensor data is never read.

* safetensors: the 8-byte length and the JSON header of each file (one file,
  or the shards a ``model.safetensors.index.json`` names);
* GGUF: the tensor infos parsed by the ``gguf`` package (which maps the file
  but touches only the header pages).

Tensors are split into vision tower, input embedding and the rest by name.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gguf import GGUFReader

from kiban.errors import KibanError

_VISION_MARKERS = (
    "visual.",
    "vision_tower",
    "vision_model",
    "vision_embed",
    "vpm.",
    "resampler.",
    "multi_modal_projector",
    "mm_projector",
    "mlp1.",
)
_EMBEDDING_NAMES = (
    "embed_tokens.weight",
    "token_embd.weight",
    "wte.weight",
    "tok_embeddings.weight",
)
_MAX_HEADER = 100 * 1024 * 1024


class WeightsError(KibanError, ValueError):
    """A weight file's header cannot be read; the message names the file."""


@dataclass(frozen=True)
class WeightTotals:
    """Bytes by part, and the tensor dtypes seen (``{"BF16": bytes, ...}``)."""

    total: int
    vision: int
    embedding: int
    dtypes: dict[str, int]
    files: int


def _part(name: str) -> str:
    if any(marker in name for marker in _VISION_MARKERS):
        return "vision"
    if name.endswith(_EMBEDDING_NAMES):
        return "embedding"
    return "other"


def _add(totals: dict[str, int], dtypes: dict[str, int], name: str, dtype: str, size: int) -> None:
    totals[_part(name)] += size
    dtypes[dtype] = dtypes.get(dtype, 0) + size


def safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of one safetensors file (reads only its first bytes)."""
    try:
        with path.open("rb") as fh:
            raw = fh.read(8)
            if len(raw) != 8:
                raise WeightsError(f"{path}: not a safetensors file (shorter than 8 bytes)")
            (size,) = struct.unpack("<Q", raw)
            if size > _MAX_HEADER:
                raise WeightsError(f"{path}: not a safetensors file (header of {size} bytes)")
            header = json.loads(fh.read(size))
    except OSError as err:
        raise WeightsError(f"{path}: {err.strerror}") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise WeightsError(f"{path}: safetensors header is not JSON") from None
    if not isinstance(header, dict):
        raise WeightsError(f"{path}: safetensors header is not a JSON object")
    return header


def safetensors_files(model_dir: Path) -> list[Path]:
    """The weight files of a HF directory: the shards of the index, else every ``*.safetensors``."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {})
        return [model_dir / name for name in sorted(set(weight_map.values()))]
    return sorted(model_dir.glob("*.safetensors"))


def read_safetensors(model_dir: Path) -> WeightTotals | None:
    """Totals over a HF directory's safetensors files; None when it has none."""
    files = safetensors_files(model_dir)
    if not files:
        return None
    totals = {"vision": 0, "embedding": 0, "other": 0}
    dtypes: dict[str, int] = {}
    for file in files:
        for name, info in safetensors_header(file).items():
            if name == "__metadata__":
                continue
            begin, end = info["data_offsets"]
            _add(totals, dtypes, name, info["dtype"], end - begin)
    return WeightTotals(
        sum(totals.values()), totals["vision"], totals["embedding"], dtypes, len(files)
    )


def read_gguf(path: Path) -> GGUFReader:
    """A ``gguf.GGUFReader`` over *path* (header parsed, tensor data only mapped)."""
    import gguf

    try:
        return gguf.GGUFReader(str(path), "r")
    except (OSError, ValueError) as err:
        raise WeightsError(f"{path}: not a readable GGUF file ({err})") from None


def gguf_totals(reader: GGUFReader) -> WeightTotals:
    """Totals over the tensor infos of a GGUF file."""
    totals = {"vision": 0, "embedding": 0, "other": 0}
    dtypes: dict[str, int] = {}
    for tensor in reader.tensors:
        _add(totals, dtypes, tensor.name, tensor.tensor_type.name, int(tensor.n_bytes))
    return WeightTotals(sum(totals.values()), totals["vision"], totals["embedding"], dtypes, 1)
