"""`kiban plan`: VRAM and KV-cache plans, from kiban.yaml or for one model."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import orjson
import typer
from rich.console import Console
from rich.table import Table

from kiban.cli.app import ConfigOption, app, fail
from kiban.config import load_config

if TYPE_CHECKING:
    from kiban.config import KibanConfig
    from kiban.planning.quick import KvRow
    from kiban.sizing.specs import ModelSpec

plan_app = typer.Typer(
    help="Plan GPU memory: weights, KV cache per token, context x concurrency, engine flags.",
    invoke_without_command=True,
)
app.add_typer(plan_app, name="plan")

out = Console(soft_wrap=False)

GpuOption = Annotated[
    str | None,
    typer.Option("--gpu", help="Plan on a known GPU type (e.g. rtx4090, h100-80), not NVML."),
]
GpuMemoryOption = Annotated[
    str | None, typer.Option("--gpu-memory", help="Plan on GPUs of this size (e.g. 24GiB).")
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print the plan as JSON.")]


@plan_app.callback()
def plan_config_cmd(
    ctx: typer.Context,
    config: ConfigOption = Path("kiban.yaml"),
    gpu: GpuOption = None,
    gpu_memory: GpuMemoryOption = None,
    gpu_count: Annotated[int, typer.Option("--gpus", min=1, help="How many such GPUs.")] = 1,
    context: Annotated[
        int | None, typer.Option(min=16, help="Ask: does this context fit (per sequence)?")
    ] = None,
    concurrency: Annotated[
        int | None, typer.Option(min=1, help="Ask: do this many sequences fit?")
    ] = None,
    engine: Annotated[
        str | None, typer.Option(help="Apply --context/--concurrency to this engine only.")
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Plan every engine with a `launch` section in kiban.yaml; exit 1 if one does not fit."""
    if ctx.invoked_subcommand is not None:
        return
    from kiban.planning.inventory import gpus_from_options
    from kiban.planning.plan import plan_config
    from kiban.planning.render import plan_dict, print_plan

    cfg = load_config(config)
    if engine is not None and all(e.name != engine for e in cfg.engines):
        raise fail(
            f"--engine: no engine {engine!r}; engines: {', '.join(e.name for e in cfg.engines)}"
        )
    if context is not None or concurrency is not None:
        cfg = _with_request(cfg, engine, context, concurrency)
    gpus = None
    if gpu is not None or gpu_memory is not None:
        try:
            gpus = gpus_from_options(gpu, gpu_memory, gpu_count)
        except ValueError as err:
            raise fail(f"--gpu/--gpu-memory: {err}") from None
    plan = plan_config(cfg, gpus)
    if as_json:
        typer.echo(orjson.dumps(plan_dict(plan), option=orjson.OPT_INDENT_2).decode())
    else:
        print_plan(plan, out)
    if not plan.ok:
        raise typer.Exit(1)


def _with_request(
    cfg: KibanConfig, engine: str | None, context: int | None, concurrency: int | None
) -> KibanConfig:
    """A copy of *cfg* whose managed engines (or *engine*) ask for context x concurrency."""
    changes = {k: v for k, v in {"context": context, "concurrency": concurrency}.items() if v}
    engines = []
    for e in cfg.engines:
        if e.launch is not None and engine in (None, e.name):
            e = e.model_copy(update={"launch": e.launch.model_copy(update=changes)})
        engines.append(e)
    return cfg.model_copy(update={"engines": engines})


@plan_app.command("model")
def plan_model(
    model: Annotated[str, typer.Argument(help="Catalogue name, HF directory or .gguf file.")],
    gpu: GpuOption = None,
    as_json: JsonOption = False,
) -> None:
    """KV bytes per token for each engine and KV dtype, and what fits on 16-141 GB GPUs."""
    from kiban.planning.models import load_spec
    from kiban.planning.quick import REFERENCE_GPUS, capacity, capacity_columns, kv_rows
    from kiban.sizing import catalogue
    from kiban.sizing.devices import gpu_from_type

    try:
        spec = load_spec(model)
    except ValueError as err:
        raise fail(str(err)) from None
    gpu_type = catalogue.find_gpu(gpu) if gpu else None
    if gpu and gpu_type is None:
        raise fail(f"--gpu: unknown GPU type {gpu!r}; known: {', '.join(catalogue.gpu_keys())}")
    target_gpu = gpu_from_type(0, gpu_type, "option") if gpu_type else None
    rows = kv_rows(spec, target_gpu)
    gpus = [gpu_type.key] if gpu_type else list(REFERENCE_GPUS)
    grid = {g: {f"{k}:{d}": capacity(model, g, k, d) for k, d in capacity_columns()} for g in gpus}
    if as_json:
        data = {
            "model": spec.name,
            "source": spec.source,
            "weights_bytes": spec.weights_bytes,
            "weights_exact": spec.weights_exact,
            "kv": [r.__dict__ for r in rows],
            "capacity": {
                g: {
                    c: {"context": v[0], "kv_tokens": v[1], "problem": v[2]} for c, v in row.items()
                }
                for g, row in grid.items()
            },
        }
        typer.echo(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode())
        return
    _print_model(spec, rows, grid)


def _print_model(
    spec: ModelSpec, rows: list[KvRow], grid: dict[str, dict[str, tuple[int, int, str]]]
) -> None:
    from kiban.sizing.units import gib

    exact = "read from the weight files" if spec.weights_exact else "estimated from shapes"
    out.print(
        f"[bold]{spec.name}[/]: {spec.num_layers} layers, {spec.num_kv_heads} KV heads x "
        f"{spec.head_dim}, max context {spec.max_context}, weights {gib(spec.weights_bytes)} "
        f"({exact}); {spec.source}"
    )
    for note in spec.notes:
        out.print(f"[yellow]note:[/] {note}")
    kv = Table(title="KV cache per token (one GPU)", title_justify="left")
    for column in ("engine", "KV dtype", "KiB/token", "GiB per 32K tokens", "layout / refusal"):
        kv.add_column(column, overflow="fold")
    for r in rows:
        if r.bytes_per_token is None:
            kv.add_row(r.kind, r.kv_dtype, "-", "-", f"[red]{r.refusal}[/]")
        else:
            per_32k = r.bytes_per_token * 32768 / 1024**3
            kv.add_row(
                r.kind, r.kv_dtype, f"{r.bytes_per_token / 1024:.2f}", f"{per_32k:.2f}", r.label
            )
    out.print(kv)
    table = Table(
        title="KV tokens on one GPU (engine alone; context per sequence in brackets)",
        title_justify="left",
    )
    table.add_column("GPU")
    columns = list(next(iter(grid.values())))
    for column in columns:
        table.add_column(column, justify="right")
    for gpu, row in grid.items():
        cells = [
            f"{tokens:,} ({context})" if not problem else "[red]does not fit[/]"
            for context, tokens, problem in row.values()
        ]
        table.add_row(gpu, *cells)
    out.print(table)


@plan_app.command("models")
def plan_models() -> None:
    """List the model catalogue."""
    from kiban.sizing import catalogue

    for name in catalogue.model_names():
        typer.echo(name)


@plan_app.command("gpus")
def plan_gpus() -> None:
    """List the GPU catalogue (names for --gpu and the `gpus:` key)."""
    from kiban.sizing import catalogue

    for key in catalogue.gpu_keys():
        gpu = catalogue.gpu_by_key(key)
        approx = " (approximate)" if gpu.approximate else ""
        typer.echo(
            f"{key:10} {gpu.name:28} {gpu.memory_bytes // 1024**2:>7} MiB{approx}  "
            f"sm{gpu.compute_capability[0]}{gpu.compute_capability[1]}"
        )
