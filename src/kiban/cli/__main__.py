"""``python -m kiban.cli``: the same command line as the ``kiban`` script."""

from kiban.cli import app

app()
