"""kiban's command line: one module per command group, all registered on one typer app.

A new command group is a new module here that imports ``app`` from
:mod:`kiban.cli.app` and is listed below.
"""

from kiban.cli import config_cmd, plan, serve  # noqa: F401  (registers the commands)
from kiban.cli.app import app

__all__ = ["app"]

if __name__ == "__main__":
    app()
