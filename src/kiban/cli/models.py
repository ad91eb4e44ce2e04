"""`kiban models ...`: models for development, built locally without downloads."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from kiban.cli.app import app, console

models_app = typer.Typer(help="Models for trying kiban without downloads.", no_args_is_help=True)
app.add_typer(models_app, name="models")


@models_app.command("tiny")
def tiny(
    dest: Annotated[Path, typer.Argument(help="Folder to write the models into.")],
    seed: Annotated[int, typer.Option(help="Weights seed; same seed, same bytes.")] = 0,
    force: Annotated[bool, typer.Option(help="Rebuild even if the files exist.")] = False,
) -> None:
    """Deterministic tiny Qwen2 models: HF safetensors (vLLM) and GGUF (llama.cpp).

    Random weights and a BPE tokenizer trained on text already on this machine,
    with a chat template: meaningless text, real engines, no download.
    """
    from kiban.models.tiny import build_tiny_gguf, build_tiny_model

    hf_dir, gguf_file = dest / "tiny-qwen2", dest / "tiny-qwen2.gguf"
    started = time.monotonic()
    if force or not (hf_dir / "model.safetensors").exists():
        with console.status(f"building {hf_dir}"):
            build_tiny_model(hf_dir, seed=seed)
    if force or not gguf_file.exists():
        with console.status(f"building {gguf_file}"):
            build_tiny_gguf(gguf_file, seed=seed)
    console.print(f"tiny models ready in {time.monotonic() - started:.1f} s:", highlight=False)
    typer.echo(f"{hf_dir}\n{gguf_file}")
