"""`kiban serve`: run the gateway in front of already running engines."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from kiban.cli.app import ConfigOption, app, fail, load_or_exit
from kiban.config import ConfigError


@app.command()
def serve(
    config: ConfigOption = Path("kiban.yaml"),
    host: Annotated[str | None, typer.Option(help="Override gateway.host.")] = None,
    port: Annotated[int | None, typer.Option(help="Override gateway.port.")] = None,
    workers: Annotated[int | None, typer.Option(help="Worker processes on one port.")] = None,
    log_level: Annotated[str, typer.Option(help="debug, info, warning, error.")] = "info",
) -> None:
    """Run the OpenAI-compatible gateway in front of the configured engines."""
    from kiban.gateway.auth import load_keys
    from kiban.gateway.server import serve as run_server

    cfg = load_or_exit(config)
    overrides = {k: v for k, v in {"host": host, "port": port, "workers": workers}.items() if v}
    if overrides:
        cfg = cfg.model_copy(update={"gateway": cfg.gateway.model_copy(update=overrides)})
    try:
        load_keys(cfg.gateway.api_keys)
    except ConfigError as err:
        raise fail(str(err)) from None
    run_server(config, cfg, overrides, log_level)
