"""kiban's command line: one module per command group, all registered on one typer app.

A new command group is a new module here that imports ``app`` from
:mod:`kiban.cli.app` and is listed below.
"""

from kiban.cli import (  # noqa: F401  (importing a module registers its commands)
    bench,
    config_cmd,
    containers,
    doctor,
    envs,
    keys,
    lifecycle,
    models,
    observability,
    plan,
    serve,
)
from kiban.cli.app import app

__all__ = ["app"]

if __name__ == "__main__":
    app()
