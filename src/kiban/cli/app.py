"""The typer application and the helpers every command module shares."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperGroup

from kiban.errors import KibanError


class _Commands(TyperGroup):
    """The command group: a :class:`KibanError` from any command is reported here, once."""

    def invoke(self, ctx: Any) -> Any:  # a typer Context (typer vendors its own click)
        try:
            return super().invoke(ctx)
        except KibanError as err:
            report(err)
            raise typer.Exit(err.exit_code) from None


app = typer.Typer(
    cls=_Commands,
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


def report(err: KibanError) -> None:
    """An error of kiban's own on stderr: ``error:`` and its message, then its problems."""
    first, *rest = err.lines()
    console.print(f"[bold red]error:[/] {escape(first)}", highlight=False)
    for line in rest:
        console.print(line, highlight=False, markup=False)
