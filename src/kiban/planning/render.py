"""Plans for people (rich tables) and for programs (JSON-ready dicts)."""

from __future__ import annotations

import dataclasses
import shlex
from typing import Any

from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from kiban.cpulist import format_cpu_list
from kiban.sizing.plan import EnginePlan, Plan
from kiban.sizing.units import KiB, gib, human


def plan_dict(plan: Plan) -> dict[str, Any]:
    """The whole plan as plain data (``kiban plan --json``)."""
    return {
        "ok": plan.ok,
        "devices": [
            {
                **dataclasses.asdict(d),
                "usable_bytes": d.usable_bytes,
                "free_bytes": d.free_bytes,
            }
            for d in plan.devices
        ],
        "engines": [engine_dict(e) for e in plan.engines],
        "problems": plan.problems,
        "warnings": plan.warnings,
    }


def engine_dict(e: EnginePlan) -> dict[str, Any]:
    """One engine's plan as plain data."""
    data = dataclasses.asdict(e)
    data["model"] = {k: v for k, v in data["model"].items() if k not in {"notes"}} | {
        "notes": list(e.model.notes)
    }
    data["kv_bytes_per_token"] = e.kv_bytes_per_token
    data["fixed_bytes"] = e.fixed_bytes
    data["tp"] = e.tp
    return data


def _fit_text(e: EnginePlan) -> Text:
    if e.fits:
        return Text(f"yes, {human(e.margin_bytes)} spare", style="green")
    return Text(f"no, short {human(-e.margin_bytes)}", style="bold red")


def devices_table(plan: Plan) -> Table:
    """One row per device: memory, what is in use, reserve, the shares, what is left."""
    table = Table(title="Devices", title_justify="left")
    for column in ("device", "name", "total", "in use", "reserve", "shares", "left"):
        table.add_column(column, justify="right" if column not in {"device", "name"} else "left")
    for d in plan.devices:
        shares = ", ".join(f"{name} {gib(b)}" for name, b in d.shares.items()) or "-"
        left = Text(gib(d.free_bytes), style="red" if d.free_bytes < 0 else "")
        table.add_row(
            d.key, d.name, gib(d.total_bytes), gib(d.used_bytes), gib(d.reserve_bytes), shares, left
        )
    return table


def _kv_dtype(e: EnginePlan) -> str:
    if e.kv_format == e.kv_format_v:
        return e.kv_format.label
    return f"K {e.kv_format.label}, V {e.kv_format_v.label}"


def engines_table(plan: Plan) -> Table:
    """One column per engine, one row per step of the arithmetic (fits narrow terminals)."""
    table = Table(title="Engines (bytes per GPU)", title_justify="left")
    table.add_column("")
    for e in plan.engines:
        table.add_column(f"{e.engine} ({e.kind})", overflow="fold")
    rows: list[tuple[str, list[Any]]] = [
        ("model", [e.model.name + ("" if e.model.weights_exact else " ~") for e in plan.engines]),
        (
            "on",
            [
                (",".join(f"gpu{i}" for i in e.gpus) if e.on_gpu else _cpu_place(e))
                + f" {e.device_name}"
                for e in plan.engines
            ],
        ),
        ("KV dtype", [_kv_dtype(e) for e in plan.engines]),
        ("KV / token", [f"{e.kv_bytes_per_token / KiB:.2f} KiB" for e in plan.engines]),
        ("weights", [gib(e.weights_bytes) for e in plan.engines]),
        ("overhead (est.)", [gib(e.overhead_bytes) for e in plan.engines]),
        ("KV cache", [gib(e.kv_cache_bytes) for e in plan.engines]),
        ("share", [gib(e.share_bytes) for e in plan.engines]),
        ("context x seqs", [f"{e.context} x {e.concurrency}" for e in plan.engines]),
        ("KV tokens", [f"{e.kv_tokens:,}" for e in plan.engines]),
        ("fits", [_fit_text(e) for e in plan.engines]),
    ]
    for label, cells in rows:
        table.add_row(label, *cells)
    return table


def flags_table(plan: Plan) -> Table:
    """The flags and environment each engine gets from the plan."""
    table = Table(title="Launch flags from the plan", title_justify="left")
    table.add_column("engine")
    table.add_column("flags and environment", overflow="fold")
    for e in plan.engines:
        if not e.fits:
            table.add_row(e.engine, Text("none: it does not fit (see the problems)", style="red"))
            continue
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in e.env.items())
        table.add_row(e.engine, " ".join(filter(None, [env, shlex.join(e.flags)])))
    return table


def plan_renderable(plan: Plan) -> Group:
    """Tables, then problems and warnings, as one printable group."""
    parts: list[Any] = [devices_table(plan), engines_table(plan), flags_table(plan)]
    parts.append(Text("~ weights estimated from config shapes (model not on disk)", style="dim"))
    for problem in plan.problems:
        parts.append(Text(f"problem: {problem}", style="bold red"))
    for warning in plan.warnings:
        parts.append(Text(f"warning: {warning}", style="yellow"))
    return Group(*parts)


def print_plan(plan: Plan, console: Console) -> None:
    console.print(plan_renderable(plan))


def _cpu_place(e: EnginePlan) -> str:
    """``cpu`` or ``cpu 0-3`` where the plan binds the engine to cores."""
    return f"cpu {format_cpu_list(e.cpus)}" if e.cpus else "cpu"
