"""Presenting a run: a rich table for people, a JSON document for programs."""

from __future__ import annotations

from typing import Any

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from kiban.bench.recorder import Distribution, Summary
from kiban.bench.runner import LoadShape
from kiban.bench.workload import Workload


def describe_shape(shape: LoadShape) -> str:
    """``closed loop, 8 clients, 1000 requests`` and the like."""
    if shape.open_loop:
        loop = f"open loop, Poisson arrivals at {shape.rate:g} req/s"
    else:
        loop = f"closed loop, {shape.concurrency} client{'s' * (shape.concurrency != 1)}"
    bounds = []
    if shape.requests is not None:
        bounds.append(f"{shape.requests} requests")
    if shape.duration_s is not None:
        bounds.append(f"{shape.duration_s:g} s")
    return f"{loop}, {' or '.join(bounds)}"


def to_json(summary: Summary, workload: Workload, shape: LoadShape) -> dict[str, Any]:
    """The ``--json`` document: what was sent, how, and what was measured."""
    return {
        "target": workload.target.url,
        "model": workload.model,
        "endpoint": workload.target.endpoint,
        "stream": workload.stream,
        "max_tokens": workload.max_tokens,
        "load": {
            "mode": "open" if shape.open_loop else "closed",
            "concurrency": None if shape.open_loop else shape.concurrency,
            "rate": shape.rate,
            "max_connections": shape.max_connections if shape.open_loop else None,
            "requests": shape.requests,
            "duration_s": shape.duration_s,
            "warmup": shape.warmup,
            "timeout_s": shape.timeout_s,
        },
        "result": summary.to_dict(),
    }


def render(summary: Summary, workload: Workload, shape: LoadShape) -> RenderableType:
    """The summary lines, the percentile table and the errors, as one renderable."""
    title = Text.assemble(
        ("kiban bench ", "bold"),
        f"POST {workload.target.url} · model {workload.model} · "
        f"{'streaming' if workload.stream else 'non-streaming'} · {describe_shape(shape)}",
    )
    facts = Table.grid(padding=(0, 2))
    facts.add_column(style="bold")
    facts.add_column()
    errors = sum(summary.errors.values())
    facts.add_row(
        "requests",
        f"{summary.ok:,} ok, {errors:,} failed, in {summary.duration_s:.2f} s",
    )
    facts.add_row("throughput", f"{summary.requests_per_s:,.1f} requests/s")
    if summary.output_tokens or workload.stream:
        source = "from usage" if not summary.usage_missing else "partly counted from chunks"
        facts.add_row(
            "output",
            f"{summary.output_tokens:,} tokens ({source}), "
            f"{summary.output_tokens_per_s:,.1f} tokens/s",
        )
    if summary.duration_s > 0:
        share = summary.client_cpu_s / summary.duration_s
        facts.add_row(
            "load generator",
            f"{summary.client_cpu_us_per_request:,.1f} µs CPU/request ({share:.0%} of one core)",
            style="yellow" if share > 0.9 else None,
        )
    if workload.stream:
        facts.add_row(
            "stream",
            f"{summary.stream_events:,} chunks, {summary.token_events:,} with tokens",
        )

    table = Table(show_edge=False, pad_edge=False, header_style="bold")
    table.add_column("ms")
    for name in ("p50", "p90", "p99", "max", "mean", "samples"):
        table.add_column(name, justify="right")
    _add(table, "latency", summary.latency_ms)
    if workload.stream:
        _add(table, "time to first token", summary.ttft_ms)
        _add(table, "inter-token latency", summary.itl_ms)

    parts: list[RenderableType] = [title, Text(), facts, Text(), table]
    if summary.errors:
        errs = Table(show_edge=False, pad_edge=False, header_style="bold red")
        errs.add_column("error")
        errs.add_column("count", justify="right")
        errs.add_column("first seen", overflow="fold")
        for kind, count in summary.errors.items():
            errs.add_row(kind, f"{count:,}", summary.error_samples.get(kind, ""))
        parts += [Text(), errs]
    for note in summary.notes:
        parts.append(Text(note, style="yellow"))
    return Group(*parts)


def _add(table: Table, name: str, dist: Distribution | None) -> None:
    if dist is None:
        table.add_row(name, *["-"] * 5, "0")
        return
    values = (dist.p50, dist.p90, dist.p99, dist.max, dist.mean)
    table.add_row(name, *(_ms(v) for v in values), f"{dist.count:,}")


def _ms(value: float) -> str:
    """Three significant figures or so: 0.412, 4.12, 41.2, 412."""
    if value < 1:
        return f"{value:.3f}"
    if value < 10:
        return f"{value:.2f}"
    if value < 100:
        return f"{value:.1f}"
    return f"{value:,.0f}"
