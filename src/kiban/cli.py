"""kiban's command line."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from kiban.config import ConfigError, KibanConfig, load_config

app = typer.Typer(
    help="kiban: one OpenAI-compatible endpoint in front of self-hosted inference engines.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
config_app = typer.Typer(help="Work with kiban.yaml.", no_args_is_help=True)
app.add_typer(config_app, name="config")

console = Console(stderr=True, soft_wrap=True)

ConfigOption = Annotated[
    Path, typer.Option("--config", "-c", help="Path to kiban.yaml.", show_default=True)
]


def _load(path: Path) -> KibanConfig:
    try:
        return load_config(path)
    except ConfigError as err:
        console.print(f"[bold red]error:[/] {err.source} is invalid:", highlight=False)
        for problem in err.problems:
            console.print(f"  - {problem}", highlight=False, markup=False)
        raise typer.Exit(2) from None


@config_app.command("check")
def config_check(config: ConfigOption = Path("kiban.yaml")) -> None:
    """Validate a configuration without starting anything."""
    cfg = _load(config)
    typer.echo(
        f"{config}: OK ({len(cfg.engines)} engines, {len(cfg.routes)} routes: "
        + ", ".join(r.model for r in cfg.routes)
        + ")"
    )


@app.command()
def serve(
    config: ConfigOption = Path("kiban.yaml"),
    host: Annotated[str | None, typer.Option(help="Override gateway.host.")] = None,
    port: Annotated[int | None, typer.Option(help="Override gateway.port.")] = None,
    workers: Annotated[int | None, typer.Option(help="Worker processes on one port.")] = None,
    log_level: Annotated[str, typer.Option(help="debug, info, warning, error.")] = "info",
) -> None:
    """Run the OpenAI-compatible gateway in front of the configured engines."""
    from kiban.gateway.auth import load_key_digests
    from kiban.gateway.server import serve as run_server

    cfg = _load(config)
    overrides = {k: v for k, v in {"host": host, "port": port, "workers": workers}.items() if v}
    if overrides:
        cfg = cfg.model_copy(update={"gateway": cfg.gateway.model_copy(update=overrides)})
    try:
        load_key_digests(cfg.gateway.api_keys)
    except ConfigError as err:
        console.print(f"[bold red]error:[/] {err}", highlight=False, markup=False)
        raise typer.Exit(2) from None
    run_server(config, cfg, overrides, log_level)


if __name__ == "__main__":
    app()
