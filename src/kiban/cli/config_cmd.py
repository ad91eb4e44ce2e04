"""`kiban config ...`: work with kiban.yaml."""

from __future__ import annotations

from pathlib import Path

import typer

from kiban.cli.app import ConfigOption, app
from kiban.config import load_config

config_app = typer.Typer(help="Work with kiban.yaml.", no_args_is_help=True)
app.add_typer(config_app, name="config")


@config_app.command("check")
def config_check(config: ConfigOption = Path("kiban.yaml")) -> None:
    """Validate a configuration without starting anything."""
    cfg = load_config(config)
    typer.echo(
        f"{config}: OK ({len(cfg.engines)} engines, {len(cfg.routes)} routes: "
        + ", ".join(r.model for r in cfg.routes)
        + ")"
    )
