"""`kiban keys add/list/revoke`: client API keys in a file that holds only their digests.

The file is the one ``gateway.api_keys.file`` names (or ``--file``). A new
key is printed once and never stored: the file keeps its SHA-256. A file in
the older one-key-per-line form is converted on the first change (plain
keys in it are hashed). Changes apply to a running gateway on `kiban reload`.
"""

from __future__ import annotations

import dataclasses
import datetime
import secrets
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
import yaml
from rich.table import Table

from kiban.cli.app import app, console, fail, out
from kiban.config import load_config

if TYPE_CHECKING:
    from kiban.gateway.usage_store import UsageRow

keys_app = typer.Typer(help="Client API keys (stored hashed), their models and limits.")
app.add_typer(keys_app, name="keys")

_HEADER = (
    "# kiban API keys, written by `kiban keys`: only SHA-256 digests of the keys.\n"
    "# Apply changes to a running gateway with `kiban reload`.\n"
)
ConfigOpt = Annotated[Path, typer.Option("--config", "-c", help="Path to kiban.yaml.")]
FileOpt = Annotated[
    Path | None, typer.Option("--file", help="Keys file (default: gateway.api_keys.file).")
]


def _keys_path(config: Path, file: Path | None) -> Path:
    if file is not None:
        return file
    if not config.exists():
        raise fail(f"{config} not found; give --file or --config")
    path = load_config(config).gateway.api_keys.file
    if path is None:
        raise fail(f"{config} sets no gateway.api_keys.file; set it or give --file")
    return path


def _read(path: Path) -> list[dict[str, Any]]:
    """The entries of *path* as `kiban keys` writes them (an older line file converted)."""
    from kiban.gateway.auth import KeyEntry, keys_yaml, read_keys_file

    if not path.exists():
        return []
    keys, problems = read_keys_file(path)
    if problems:
        raise fail("; ".join(problems))
    tree = keys_yaml(path.read_text(encoding="utf-8"))
    if tree is not None:
        return [KeyEntry.model_validate(k).model_dump(exclude_none=True) for k in tree["keys"]]
    console.print(f"converting {path} to the keys format (plain keys in it are hashed)")
    return [{"name": k.name, "sha256": k.digest.hex()} for k in keys]


def _write(path: Path, entries: list[dict[str, Any]]) -> None:
    from kiban.run_state import write_atomically

    text = _HEADER + yaml.safe_dump({"keys": entries}, sort_keys=False)
    write_atomically(path, text.encode("utf-8"), mode=0o600)


@keys_app.command("add")
def add(
    name: Annotated[str, typer.Argument(help="A name for the key (who or what uses it).")],
    models: Annotated[
        str | None, typer.Option(help="Comma-separated models this key may use (default: all).")
    ] = None,
    rpm: Annotated[int | None, typer.Option(help="Requests per minute.", min=1)] = None,
    tpm: Annotated[int | None, typer.Option(help="Tokens per minute.", min=1)] = None,
    admin: Annotated[
        bool, typer.Option("--admin", help="May open the console and read usage per key.")
    ] = False,
    config: ConfigOpt = Path("kiban.yaml"),
    file: FileOpt = None,
) -> None:
    """Create a key; prints it once (only its SHA-256 is kept)."""
    from pydantic import ValidationError

    from kiban.gateway.auth import KeyEntry, digest_of

    path = _keys_path(config, file)
    entries = _read(path)
    if any(e["name"] == name for e in entries):
        raise fail(f"a key named {name!r} exists already in {path}; revoke it first")
    key = "sk-kiban-" + secrets.token_urlsafe(32)
    entry: dict[str, Any] = {"name": name, "sha256": digest_of(key).hex()}
    if models:
        entry["models"] = [m.strip() for m in models.split(",") if m.strip()]
    if rpm:
        entry["requests_per_minute"] = rpm
    if tpm:
        entry["tokens_per_minute"] = tpm
    if admin:
        entry["admin"] = True
    entry["created"] = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    try:
        KeyEntry.model_validate(entry)
    except ValidationError as err:
        raise fail(f"invalid key entry: {err.errors()[0]['msg']}") from None
    _write(path, [*entries, entry])
    console.print(f"added key {name!r} to {path}; it is shown once, keep it now:")
    print(key)


@keys_app.command("list")
def list_keys(config: ConfigOpt = Path("kiban.yaml"), file: FileOpt = None) -> None:
    """The keys of the file: name, digest prefix, models, limits."""
    path = _keys_path(config, file)
    table = Table(title=str(path), title_justify="left")
    for column in ("name", "sha256", "admin", "models", "requests/min", "tokens/min", "created"):
        table.add_column(column)
    for e in _read(path):
        table.add_row(
            e["name"],
            e["sha256"][:12] + "…",
            "yes" if e.get("admin") else "",
            ", ".join(e["models"]) if "models" in e else "all",
            str(e.get("requests_per_minute", "default")),
            str(e.get("tokens_per_minute", "default")),
            e.get("created", ""),
        )
    out.print(table)


@keys_app.command("revoke")
def revoke(
    name: Annotated[str, typer.Argument(help="The key's name.")],
    config: ConfigOpt = Path("kiban.yaml"),
    file: FileOpt = None,
) -> None:
    """Remove a key (a running gateway drops it on `kiban reload`)."""
    path = _keys_path(config, file)
    entries = _read(path)
    kept = [e for e in entries if e["name"] != name]
    if len(kept) == len(entries):
        raise fail(f"no key named {name!r} in {path}")
    _write(path, kept)
    console.print(f"revoked {name!r}; run `kiban reload` to apply it to a running gateway")


@keys_app.command("usage")
def usage(
    name: Annotated[str | None, typer.Argument(help="One key's name (default: every key).")] = None,
    since: Annotated[str, typer.Option(help="How far back: 90m, 12h, 7d, 2w.")] = "7d",
    as_json: Annotated[bool, typer.Option("--json", help="One row per key and hour.")] = False,
    config: ConfigOpt = Path("kiban.yaml"),
    file: FileOpt = None,
) -> None:
    """Requests and tokens per key, as the gateway stored them (SQLite, or Redis)."""
    import asyncio
    import json
    import time

    from kiban.gateway.usage_store import totals
    from kiban.observability.report import parse_period

    try:
        start = time.time() - parse_period(since)
    except ValueError as err:
        raise fail(f"--since: {err}") from None
    rows = asyncio.run(_usage_rows(config, file, start, name))
    if as_json:
        typer.echo(json.dumps([dataclasses.asdict(r) for r in rows], indent=2))
        return
    table = Table(title=f"usage since {since} ago", title_justify="left")
    for column in ("key", "requests", "prompt tokens", "completion tokens"):
        table.add_column(column, justify="left" if column == "key" else "right")
    for key, (requests, prompt, completion) in sorted(totals(rows).items()):
        table.add_row(key, f"{requests:,}", f"{prompt:,}", f"{completion:,}")
    out.print(table)


async def _usage_rows(
    config: Path, file: Path | None, since: float, name: str | None
) -> list[UsageRow]:
    """The stored rows: from Redis when kiban.yaml sets gateway.shared_state, else SQLite."""
    from kiban.gateway.usage_store import SqliteUsage, usage_path

    cfg = load_config(config) if file is None or config.exists() else None
    shared = cfg.gateway.shared_state if cfg is not None else None
    if shared is None:
        return SqliteUsage(usage_path(_keys_path(config, file))).rows(since, name)
    import redis.asyncio as aioredis

    from kiban.gateway.usage_store import RedisUsageStore

    client = aioredis.Redis.from_url(shared.url, socket_timeout=shared.timeout_s)
    try:
        return await RedisUsageStore(client, shared.prefix).rows(since, name)
    except Exception as err:
        raise fail(f"gateway.shared_state: cannot read usage from {shared.url}: {err}") from None
    finally:
        await client.aclose()
