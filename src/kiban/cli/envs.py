"""`kiban envs ...`: the engines' pinned virtual environments, listed and built ahead of use."""

from __future__ import annotations

from typing import Annotated

import typer

from kiban.cli.app import app, console, fail, out

envs_app = typer.Typer(
    help="Engine environments (one pinned venv per engine under ~/.cache/kiban/envs).",
    no_args_is_help=True,
)
app.add_typer(envs_app, name="envs")


@envs_app.command("list")
def list_envs() -> None:
    """Every environment kiban knows, where it lives and whether it is built and current."""
    from kiban.deploy.envs import ENGINE_ENVS, env_root, marker_state

    for name, spec in sorted(ENGINE_ENVS.items()):
        root = env_root(name)
        out.print(f"{name:16} {marker_state(root, spec):10} {root}", highlight=False)


@envs_app.command("build")
def build(
    names: Annotated[list[str], typer.Argument(help="Environments to build, e.g. vllm-cpu.")],
) -> None:
    """Build (or repair) environments now, so that `kiban up` and the tests need not wait.

    An environment that is built and current is left as it is. Exit 2 on an unknown
    name, 1 when a build fails (its message ends with the failed step's output).
    """
    from kiban.deploy.envs import ENGINE_ENVS, ensure_engine_env

    unknown = [n for n in names if n not in ENGINE_ENVS]
    if unknown:
        raise fail(f"unknown environment {unknown[0]!r}; known: {', '.join(sorted(ENGINE_ENVS))}")
    for name in names:
        env = ensure_engine_env(name, progress=console.print)  # says "ready in N s"
        typer.echo(env.root)
