"""Turn a model reference (local directory, local GGUF file, catalogue name) into a ModelSpec."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kiban.errors import KibanError
from kiban.planning.hf_config import ModelConfigError, is_vision_model, shape_fields
from kiban.planning.params import estimate_weight_bytes
from kiban.planning.weights import WeightsError, gguf_totals, read_gguf, read_safetensors
from kiban.sizing import catalogue
from kiban.sizing.specs import ModelSpec

if TYPE_CHECKING:
    from gguf import GGUFReader

_SLIDING_KEYS = ("attention.sliding_window",)


class UnknownModelError(KibanError, LookupError):
    """Neither a local model nor a catalogue name; the message lists what is accepted."""


def load_spec(reference: str) -> ModelSpec:
    """The spec of *reference*: a HF directory, a ``.gguf`` file, or a catalogue name."""
    path = Path(reference).expanduser()
    if path.is_dir():
        return spec_from_hf_dir(path)
    if path.is_file() and path.suffix == ".gguf":
        return spec_from_gguf(path)
    entry = catalogue.find_model(reference)
    if entry is None:
        raise UnknownModelError(
            f"model {reference!r} is not a local directory with config.json, not a .gguf file "
            f"and not in kiban's catalogue (`kiban plan models` lists "
            f"{len(catalogue.model_names())} names)"
        )
    return spec_from_catalogue(entry)


def spec_from_catalogue(entry: catalogue.CatalogueModel) -> ModelSpec:
    """Shapes from the catalogue's config excerpt; weight bytes estimated from them."""
    fields = shape_fields(entry.config)
    quantization = entry.quantization or fields.pop("quantization")
    fields.pop("quantization", None)
    dtype_bytes = 4 if fields["dtype"] == "float32" else 2
    total, vision, embedding = estimate_weight_bytes(
        entry.config, quantization, dtype_bytes, entry.vision_params
    )
    name = entry.name + (f" ({quantization})" if entry.quantization else "")
    return ModelSpec(
        name=name,
        **fields,
        quantization=quantization,
        weights_bytes=total,
        vision_bytes=vision,
        embedding_bytes=embedding,
        weights_exact=False,
        source=f"catalogue: {entry.source}",
        notes=(entry.note,) if entry.note else (),
    )


def spec_from_hf_dir(model_dir: Path) -> ModelSpec:
    """Shapes from config.json, exact weight bytes from the safetensors headers."""
    config_path = model_dir / "config.json"
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except OSError as err:
        raise ModelConfigError(f"{config_path}: {err.strerror}") from None
    except json.JSONDecodeError as err:
        raise ModelConfigError(f"{config_path}: not JSON ({err})") from None
    fields = shape_fields(config)
    try:
        totals = read_safetensors(model_dir)
    except WeightsError:
        raise
    notes: tuple[str, ...] = ()
    if totals is None:
        dtype_bytes = 4 if fields["dtype"] == "float32" else 2
        quantization = fields["quantization"]
        total, vision, embedding = estimate_weight_bytes(config, quantization, dtype_bytes)
        exact = False
        notes = ("no *.safetensors files: weight bytes estimated from config.json shapes",)
        if is_vision_model(config):
            notes += ("vision tower size unknown without weight files",)
    else:
        total, vision, embedding, exact = totals.total, totals.vision, totals.embedding, True
    return ModelSpec(
        name=model_dir.name,
        **fields,
        weights_bytes=total,
        vision_bytes=vision,
        embedding_bytes=embedding,
        weights_exact=exact,
        source=f"local: {model_dir}",
        notes=notes,
    )


def _field(reader: GGUFReader, key: str) -> Any:
    field = reader.get_field(key)
    return None if field is None else field.contents()


def spec_from_gguf(path: Path) -> ModelSpec:
    """Shapes from GGUF metadata, exact weight bytes from its tensor infos."""
    reader = read_gguf(path)
    arch = _field(reader, "general.architecture") or "unknown"

    def meta(key: str, default: Any = None) -> Any:
        value = _field(reader, f"{arch}.{key}")
        return default if value is None else value

    layers = meta("block_count")
    heads = meta("attention.head_count")
    hidden = meta("embedding_length")
    if not (layers and heads and hidden):
        raise ModelConfigError(f"{path}: GGUF metadata lacks {arch}.block_count/head_count")
    kv_heads = meta("attention.head_count_kv", heads)
    if isinstance(kv_heads, list):  # per-layer list in some architectures
        kv_heads = max(kv_heads)
    head_dim = meta("attention.key_length", hidden // heads)
    tokens = reader.get_field("tokenizer.ggml.tokens")
    vocab = meta("vocab_size") or (len(tokens.data) if tokens is not None else 0)
    window = meta("attention.sliding_window")
    totals = gguf_totals(reader)
    file_type = _field(reader, "general.file_type")
    return ModelSpec(
        name=path.name,
        architecture=arch,
        model_type=arch,
        num_layers=int(layers),
        num_heads=int(heads),
        num_kv_heads=int(kv_heads),
        head_dim=int(head_dim),
        v_head_dim=int(meta("attention.value_length", head_dim)),
        hidden_size=int(hidden),
        intermediate_size=int(meta("feed_forward_length", 4 * hidden) or 4 * hidden),
        vocab_size=int(vocab),
        max_context=int(meta("context_length", 4096)),
        dtype="float16",
        sliding_window=int(window) if window else None,
        sliding_layers=0,
        weights_bytes=totals.total,
        vision_bytes=totals.vision,
        embedding_bytes=totals.embedding,
        weights_exact=True,
        quantization=f"gguf:file_type={file_type}" if file_type is not None else "gguf",
        source=f"local: {path}",
        notes=("GGUF sliding-window layer pattern not read; all layers planned as full",)
        if window
        else (),
    )
