"""``kiban observability render``, ``kiban gpu-exporter`` and ``kiban report``."""

from __future__ import annotations

import json
import signal
import threading
from pathlib import Path
from typing import Annotated

import typer

from kiban.cli.app import ConfigOption, app, console, fail
from kiban.config import load_config

observability_app = typer.Typer(
    help="Prometheus and Grafana files for a kiban.yaml.", no_args_is_help=True
)
app.add_typer(observability_app, name="observability")


@observability_app.command("render")
def render_cmd(
    config: ConfigOption = Path("kiban.yaml"),
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory to write into.")] = Path(
        "observability"
    ),
    target_host: Annotated[
        str | None,
        typer.Option(help="Host Prometheus reaches every target by (e.g. host.docker.internal)."),
    ] = None,
    grafana_dashboards_path: Annotated[
        str | None,
        typer.Option(help="Where Grafana finds the dashboards (default: OUT/grafana/dashboards)."),
    ] = None,
) -> None:
    """Write prometheus.yml, alert and recording rules, Grafana provisioning and dashboards."""
    from kiban.observability.render import render

    cfg = load_config(config)
    try:
        done = render(
            cfg, out, target_host=target_host, grafana_dashboards_path=grafana_dashboards_path
        )
    except (OSError, FileNotFoundError) as err:
        raise fail(str(err)) from None
    typer.echo(f"wrote {done.prometheus_config}")
    for path in done.rule_files:
        typer.echo(f"wrote {path}")
    typer.echo(f"wrote {done.grafana_provisioning}/ (datasource, dashboard provider)")
    for path in done.dashboards:
        typer.echo(f"wrote {path}")
    typer.echo(
        f"run: prometheus --config.file={done.prometheus_config}; "
        f"Grafana: GF_PATHS_PROVISIONING={done.grafana_provisioning}"
    )


@app.command("gpu-exporter")
def gpu_exporter(
    port: Annotated[int, typer.Option(help="Port to serve /metrics on.")] = 9835,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    xid: Annotated[bool, typer.Option(help="Watch NVML events for XID errors.")] = True,
) -> None:
    """Serve NVML GPU metrics (kiban_gpu_*) for Prometheus, without the gateway."""
    from prometheus_client import CollectorRegistry, start_http_server

    from kiban.observability.gpu import GpuCollector

    collector = GpuCollector(watch_xid=xid)
    registry = CollectorRegistry()
    registry.register(collector)
    try:
        server, thread = start_http_server(port, addr=host, registry=registry)
    except OSError as err:
        raise fail(f"cannot listen on {host}:{port}: {err.strerror or err}") from None
    if collector.available:
        console.print(f"kiban gpu-exporter: {collector.describe_state()}", highlight=False)
    else:
        console.print(
            f"[bold yellow]kiban gpu-exporter: {collector.describe_state()}[/]; "
            "serving kiban_gpu_nvml_available 0",
            highlight=False,
        )
    console.print(f"serving http://{host}:{port}/metrics", highlight=False)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    server.shutdown()
    thread.join(timeout=5)
    collector.close()


@app.command("report")
def report_cmd(
    config: ConfigOption = Path("kiban.yaml"),
    prometheus: Annotated[
        str | None,
        typer.Option(help="Prometheus URL (default: observability.prometheus_url of kiban.yaml)."),
    ] = None,
    period: Annotated[str, typer.Option(help="How far back: 1h, 1d, 7d, 1w.")] = "1d",
    end: Annotated[
        float | None, typer.Option(help="End of the period, Unix time (default: now).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    html_out: Annotated[
        Path | None,
        typer.Option("--html", help="Also write one self-contained HTML page with charts."),
    ] = None,
) -> None:
    """Per GPU over a period: VRAM and KV-cache pressure, queueing, tokens/s, errors."""
    from rich.console import Console

    from kiban.observability.report import (
        Prometheus,
        build_report,
        parse_period,
        render_table,
    )

    resolution_s = 15.0
    if config.exists():
        obs = load_config(config).observability
        prometheus = prometheus or obs.prometheus_url
        resolution_s = obs.scrape_interval_s
    elif prometheus is None:
        raise fail(f"give --prometheus URL, or a kiban.yaml with -c ({config} not found)")
    try:
        seconds = parse_period(period)
    except ValueError as err:
        raise fail(str(err)) from None
    report = build_report(Prometheus(prometheus), seconds, end, resolution_s)
    if html_out is not None:
        from kiban.observability.report_html import collect_series, render_html

        series = collect_series(Prometheus(prometheus), report, resolution_s)
        html_out.write_text(render_html(report, series), encoding="utf-8")
        typer.echo(f"wrote {html_out}", err=True)
    if as_json:
        typer.echo(json.dumps(report.as_dict(), indent=2))
    else:
        Console().print(render_table(report))
