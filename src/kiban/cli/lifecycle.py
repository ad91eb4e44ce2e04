"""`kiban up`, `down`, `status`, `logs`: managed engines and the gateway in front of them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Annotated

import typer
from rich.live import Live
from rich.table import Table

from kiban.cli.app import ConfigOption, app, console, fail, out
from kiban.config import load_config
from kiban.deploy.supervisor import Supervisor, SupervisorError, http_ok
from kiban.engines import ENGINE_KINDS
from kiban.observability.snapshot import EngineTarget, LiveSnapshot, snapshot
from kiban.processes import spawn, stop_group, tail
from kiban.run_state import ProcessRecord, RunDir, RunState

if TYPE_CHECKING:
    from kiban.config import LaunchConfig

_HANDOVER_S = 30.0
_STATE_STYLE = {
    "running": "green",
    "starting": "yellow",
    "restarting": "yellow",
    "failed": "bold red",
    "stopped": "dim",
}


def _on_stop_signals(handler: Callable[[int, FrameType | None], None]) -> None:
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, handler)


def _start_table(states: dict[str, str], started: float) -> Table:
    table = Table(title=f"starting ({time.monotonic() - started:.0f} s)", title_justify="left")
    table.add_column("process")
    table.add_column("state")
    for name, state in states.items():
        table.add_row(name, f"[{_STATE_STYLE.get(state, '')}]{state}[/]")
    return table


@app.command()
def up(
    config: ConfigOption = Path("kiban.yaml"),
    detach: Annotated[
        bool, typer.Option("--detach", "-d", help="Return once up; a daemon supervises.")
    ] = False,
    docker: Annotated[
        bool,
        typer.Option("--docker", help="Run everything in containers (kiban compose) with Docker."),
    ] = False,
) -> None:
    """Start every managed engine, then the gateway; restart what crashes until `kiban down`."""
    if docker:
        from kiban.cli.containers import docker_up

        docker_up(config)
        return
    cfg = load_config(config)
    supervisor = Supervisor(cfg, config, say=lambda msg: console.print(msg, highlight=False))
    try:
        supervisor.lock()
        with console.status("preparing engine environments") as status:
            supervisor.prepare(progress=lambda msg: status.update(msg))
        started = time.monotonic()
        with Live(console=console, transient=True) as live:
            supervisor.start(tick=lambda states: live.update(_start_table(states, started)))
    except SupervisorError:
        supervisor.run_dir.unlock()
        raise
    _print_status(supervisor.state)
    if detach:
        _hand_over(supervisor, config)
        return
    console.print("supervising; Ctrl+C stops everything", highlight=False)
    _on_stop_signals(lambda *_: setattr(supervisor, "stopping", True))
    supervisor.watch()
    console.print("stopping", highlight=False)
    supervisor.shutdown()


def _hand_over(supervisor: Supervisor, config: Path) -> None:
    """Start the supervising daemon, which adopts every process, and return."""
    supervisor.run_dir.unlock()
    argv = [sys.executable, "-m", "kiban.cli", "supervise", "-c", str(config.resolve())]
    daemon = spawn(argv, dict(os.environ), supervisor.run_dir.log_path("supervisor"))
    deadline = time.monotonic() + _HANDOVER_S
    while time.monotonic() < deadline:
        state = supervisor.run_dir.read()
        if state is not None and state.supervisor_pid == daemon.pid:
            console.print(f"up; supervisor daemon PID {daemon.pid}", highlight=False)
            return
        if daemon.poll() is not None:
            break
        time.sleep(0.2)
    log = supervisor.run_dir.log_path("supervisor")
    console.print(f"[bold red]the supervisor daemon did not take over[/]; {log}:\n{tail(log)}")
    supervisor.shutdown()
    raise typer.Exit(1)


@app.command(hidden=True)
def supervise(config: ConfigOption = Path("kiban.yaml")) -> None:
    """Adopt what `kiban up --detach` started and supervise it (runs as a daemon)."""
    cfg = load_config(config)
    supervisor = Supervisor(cfg, config, say=lambda msg: print(msg, flush=True))
    previous = supervisor.run_dir.read()
    if previous is None:
        raise fail(f"nothing to supervise: no state in {supervisor.run_dir.root}")
    supervisor.lock()
    supervisor.prepare(adopting=True)
    supervisor.adopt(previous)
    _on_stop_signals(lambda *_: setattr(supervisor, "stopping", True))
    print(f"supervising {len(supervisor.managed)} processes", flush=True)
    supervisor.watch()
    supervisor.shutdown()
    print("stopped", flush=True)


@app.command()
def down(
    config: ConfigOption = Path("kiban.yaml"),
    docker: Annotated[
        bool, typer.Option("--docker", help="Stop what `kiban up --docker` started.")
    ] = False,
) -> None:
    """Stop the gateway and every managed engine of this configuration."""
    if docker:
        from kiban.cli.containers import docker_down

        docker_down(config)
        return
    run_dir = RunDir(config)
    state = run_dir.read()
    if state is None:
        raise fail(f"kiban is not up for {config} (no {run_dir.state_file})", code=1)
    sup = state.supervisor
    if sup is not None and sup.alive():
        os.kill(sup.pid, signal.SIGTERM)
        grace = max((launch.stop_grace_s for launch in _launches(config)), default=20.0)
        deadline = time.monotonic() + grace + 45
        with console.status(f"stopping (supervisor PID {sup.pid})"):
            while sup.alive() and time.monotonic() < deadline:
                time.sleep(0.2)
        if sup.alive():
            raise fail(f"supervisor PID {sup.pid} did not stop; see {run_dir.logs}", code=1)
    else:
        # the supervisor is gone (killed?): stop what it left behind ourselves
        for rec in state.records():
            if rec.ident is not None:
                stop_group(rec.ident, 20.0)
            rec.state = "stopped"
        state.supervisor_pid = state.supervisor_start_ticks = None
        run_dir.write(state)
    console.print("down", highlight=False)


def _launches(config: Path) -> list[LaunchConfig]:
    try:
        cfg = load_config(config)
    except typer.Exit:
        return []
    return [e.launch for e in cfg.engines if e.launch is not None]


@app.command()
def status(
    config: ConfigOption = Path("kiban.yaml"),
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    live: Annotated[
        bool, typer.Option(help="Scrape the engines' and gateway's metrics for live figures.")
    ] = True,
) -> None:
    """Engines and gateway: state, health, uptime, restarts, URL, and live figures
    (tokens/s, requests running and waiting, KV cache, in-flight, GPU memory)."""
    run_dir = RunDir(config)
    state = run_dir.read()
    if state is None:
        raise fail(f"kiban is not up for {config} (no {run_dir.state_file})", code=1)
    figures = _live(state) if live else None
    if as_json:
        rows = [_row(rec) for rec in state.records()]
        for row in rows:
            if figures is not None and row["name"] in figures.engines:
                row["live"] = asdict(figures.engines[str(row["name"])])
        sup = state.supervisor
        document = {"supervisor_alive": bool(sup and sup.alive()), "processes": rows}
        if figures is not None:
            document["in_flight"] = figures.in_flight
            document["gpu_memory"] = figures.gpu_memory
        typer.echo(json.dumps(document))
        return
    _print_status(state, figures)


def _live(state: RunState) -> LiveSnapshot | None:
    targets = []
    for rec in state.engines.values():
        kind = ENGINE_KINDS[rec.kind]
        if kind.metrics.path is None or rec.state not in ("running", "starting"):
            continue
        names = kind.metrics.names
        targets.append(
            EngineTarget(
                name=rec.name,
                metrics_url=rec.url + kind.metrics.path,
                running=names.requests_running,
                waiting=names.requests_waiting,
                kv_cache_usage=names.kv_cache_usage,
                generation_tokens=names.generation_tokens,
            )
        )
    gateway = state.gateway
    gateway_url = gateway.url + "/metrics" if gateway and gateway.state == "running" else None
    if not targets and gateway_url is None:
        return None
    return snapshot(targets, gateway_url)


def _row(rec: ProcessRecord) -> dict[str, object]:
    alive = rec.ident is not None and rec.ident.alive()
    health_path = ENGINE_KINDS[rec.kind].dialect.health_path if rec.kind else "/health"
    healthy = alive and http_ok(rec.url + health_path, timeout=1.0)
    uptime = time.time() - rec.started_at if alive and rec.started_at else None
    return {
        "name": rec.name,
        "kind": rec.kind or "kiban",
        "model": rec.model,
        "device": rec.device,
        "gpus": rec.gpus,
        "state": rec.state if alive or rec.state in ("failed", "stopped", "restarting") else "dead",
        "healthy": healthy,
        "pid": rec.pid if alive else None,
        "uptime_s": None if uptime is None else round(uptime, 1),
        "restarts": rec.restarts,
        "url": rec.url,
        "gpu_verified": rec.gpu_verified,
        "message": rec.message,
    }


def _figure(value: float | None, pattern: str) -> str:
    return "-" if value is None else pattern.format(value)


def _print_status(state: RunState, figures: LiveSnapshot | None = None) -> None:
    table = Table(title=f"kiban: {state.config}", title_justify="left")
    columns = ["engine", "kind", "model", "GPU", "state", "health", "uptime", "restarts", "URL"]
    if figures is not None:
        columns += ["tok/s", "running", "waiting", "KV"]
    for column in columns:
        table.add_column(column)
    notes = []
    for rec in state.records():
        row = _row(rec)
        gpu = ",".join(map(str, rec.gpus)) if rec.gpus else (rec.device or "-")
        if rec.gpu_verified is True:
            gpu += " ✓"
        elif rec.gpu_verified is False:
            gpu += " ✗"
        health = "[green]ok[/]" if row["healthy"] else "[red]down[/]"
        uptime_s = row["uptime_s"]
        uptime = _duration(uptime_s) if isinstance(uptime_s, float) else "-"
        style = _STATE_STYLE.get(str(row["state"]), "red")
        model = Path(rec.model).name or "-"
        state_cell = f"[{style}]{row['state']}[/]"
        cells = [
            rec.name,
            str(row["kind"]),
            model,
            gpu,
            state_cell,
            health,
            uptime,
            str(rec.restarts),
            rec.url,
        ]
        if figures is not None:
            live = figures.engines.get(rec.name)
            cells += [
                _figure(live.tokens_per_s if live else None, "{:.1f}"),
                _figure(live.running if live else None, "{:.0f}"),
                _figure(live.waiting if live else None, "{:.0f}"),
                _figure(live.kv_cache_usage if live else None, "{:.0%}"),
            ]
        table.add_row(*cells)
        if rec.message:
            notes.append(f"{rec.name}: {rec.message}")
    out.print(table)
    for note in notes:
        out.print(f"  {note}", highlight=False, markup=False)
    if figures is not None:
        line = f"gateway in flight: {_figure(figures.in_flight, '{:.0f}')}"
        for gpu, (used, size) in sorted(figures.gpu_memory.items()):
            line += f"; GPU {gpu} memory {used / 2**30:.1f}/{size / 2**30:.1f} GiB"
        out.print(line, highlight=False)


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


@app.command()
def logs(
    engine: Annotated[str, typer.Argument(help="Engine name, or 'gateway' / 'supervisor'.")],
    config: ConfigOption = Path("kiban.yaml"),
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing.")] = False,
    lines: Annotated[int, typer.Option("--lines", "-n", help="Lines to show.")] = 50,
) -> None:
    """Show an engine's log (or the gateway's, or the supervisor's)."""
    run_dir = RunDir(config)
    path = run_dir.log_path(engine)
    if not path.exists():
        known = sorted(p.stem for p in run_dir.logs.glob("*.log")) if run_dir.logs.is_dir() else []
        raise fail(f"no log for {engine!r}; known: {', '.join(known) or 'none (never up)'}", 1)
    if not follow:
        typer.echo(tail(path, lines))
        return
    with subprocess.Popen(["tail", "-n", str(lines), "-F", str(path)]) as proc:
        try:
            proc.wait()
        except KeyboardInterrupt:
            proc.terminate()
