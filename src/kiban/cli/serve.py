"""`kiban serve`: run the gateway in front of already running engines."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from kiban.cli.app import ConfigOption, app, fail, out
from kiban.config import load_config


@app.command()
def serve(
    config: ConfigOption = Path("kiban.yaml"),
    host: Annotated[str | None, typer.Option(help="Override gateway.host.")] = None,
    port: Annotated[int | None, typer.Option(help="Override gateway.port.")] = None,
    workers: Annotated[int | None, typer.Option(help="Worker processes on one port.")] = None,
    log_level: Annotated[str, typer.Option(help="debug, info, warning, error.")] = "info",
) -> None:
    """Run the OpenAI-compatible gateway in front of the configured engines (SIGHUP reloads)."""
    from kiban.gateway.auth import load_keys
    from kiban.gateway.server import serve as run_server
    from kiban.gateway.server import with_overrides

    overrides: dict[str, object] = {
        k: v for k, v in {"host": host, "port": port, "workers": workers}.items() if v
    }
    cfg = with_overrides(load_config(config), overrides)
    keys = load_keys(cfg.gateway.api_keys)
    run_server(config, cfg, keys, overrides, log_level)


@app.command()
def reload(
    config: ConfigOption = Path("kiban.yaml"),
    timeout: Annotated[float, typer.Option(help="Seconds to wait for every worker.")] = 30.0,
) -> None:
    """Apply an edited configuration to the running gateway without dropping requests.

    The configuration is checked first (an invalid one is refused here and the
    gateway keeps serving); then the gateway gets SIGHUP and every worker
    reports whether it applied it.
    """
    import json
    import os
    import signal
    import time

    from kiban.gateway.auth import load_keys
    from kiban.processes import ProcessId
    from kiban.run_state import RunDir

    cfg = load_config(config)
    # the keys file; environment variables are the serving process's own
    load_keys(cfg.gateway.api_keys.model_copy(update={"env": []}))
    run_dir = RunDir(config)
    serving = run_dir.root / "gateway.json"
    try:
        info = json.loads(serving.read_text())
    except (OSError, ValueError):
        raise fail(f"no gateway serving {config} ({serving} is missing)") from None
    ident = ProcessId(info["pid"], info["start_ticks"]) if info.get("start_ticks") else None
    if ident is None or not ident.alive():
        raise fail(f"the gateway recorded in {serving} (PID {info['pid']}) is not running")
    asked = time.time()
    os.kill(info["pid"], signal.SIGHUP)
    pending = set(info["workers"])
    deadline = time.monotonic() + timeout
    failed = False
    while pending and time.monotonic() < deadline:
        for pid in sorted(pending | {info["pid"]}):
            try:
                outcome = json.loads((run_dir.root / "reload" / f"{pid}.json").read_text())
            except (OSError, ValueError):
                continue
            if outcome.get("at", 0) < asked:
                continue
            pending.discard(pid)
            if outcome["ok"]:
                notes = "".join(f"\n    note: {n}" for n in outcome.get("notes", []))
                out.print(f"PID {pid}: applied (generation {outcome['generation']}){notes}")
            else:
                failed = True
                out.print(f"PID {pid}: rejected", highlight=False)
                for problem in outcome["problems"]:
                    out.print(f"  - {problem}", highlight=False, markup=False)
                pending.clear()  # the parent refused it: no worker will reload
        time.sleep(0.1)
    if pending:
        raise fail(f"no reload report from PID(s) {sorted(pending)} within {timeout:g} s")
    if failed:
        raise typer.Exit(1)
