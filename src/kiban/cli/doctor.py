"""`kiban doctor`: check this machine (and optionally a kiban.yaml) for what kiban needs."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from kiban.cli.app import app, out
from kiban.config import load_config

_STYLE = {"ok": "green", "warn": "yellow", "fail": "bold red", "info": "dim"}


@app.command()
def doctor(
    config: Annotated[
        Path | None, typer.Option("--config", "-c", help="Also check this kiban.yaml.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Python, NVML and driver, GPUs and free memory, WSL2, Docker and the NVIDIA runtime,
    ports and engine environments; each problem with what to do. Exit 1 on a failure."""
    from kiban.deploy.doctor import run_checks

    if config is None and Path("kiban.yaml").exists():
        config = Path("kiban.yaml")
    cfg = load_config(config) if config is not None else None
    findings = run_checks(cfg)
    if as_json:
        typer.echo(json.dumps([asdict(f) for f in findings], indent=2))
    else:
        table = Table(title="kiban doctor", title_justify="left")
        for column in ("area", "status", "detail", "what to do"):
            table.add_column(column, overflow="fold")
        for f in findings:
            table.add_row(f.area, f"[{_STYLE[f.status]}]{f.status}[/]", f.detail, f.fix)
        out.print(table)
    if any(f.status == "fail" for f in findings):
        raise typer.Exit(1)
