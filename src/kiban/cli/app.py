"""The typer application and the helpers every command module shares."""

from __future__ import annotations

import sys
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

console = Console(stderr=True, soft_wrap=True)
#: results (tables, reports) on stdout; 160 columns when piped, so nothing is cut
out = Console(width=None if sys.stdout.isatty() else 160)

ConfigOption = Annotated[
    Path, typer.Option("--config", "-c", help="Path to kiban.yaml.", show_default=True)
]


def fail(message: str, code: int = 2) -> typer.Exit:
    """Print an error line on stderr; return the Exit to raise."""
    console.print(f"[bold red]error:[/] {message}", highlight=False)
    return typer.Exit(code)


def load_or_exit(path: Path) -> KibanConfig:
    """Load a configuration or print every problem and exit with status 2."""
    try:
        return load_config(path)
    except ConfigError as err:
        print_config_error(err)
        raise typer.Exit(2) from None


def print_config_error(err: ConfigError) -> None:
    """Every problem of a ConfigError, one per line, on stderr."""
    console.print(f"[bold red]error:[/] {err.source} is invalid:", highlight=False)
    for problem in err.problems:
        console.print(f"  - {problem}", highlight=False, markup=False)
