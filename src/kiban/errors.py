"""The root of kiban's own exceptions.

Every error kiban raises on purpose derives from :class:`KibanError`. The
command line catches that root once (:mod:`kiban.cli.app`) and prints it the
same way for every command: ``error: <message>``, then one indented line per
problem when the error carries several, and exits with the error's
``exit_code``. The API's errors (:mod:`kiban.api_errors`) derive from it too.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar


class KibanError(Exception):
    """An error kiban reports to its user: a message, perhaps problems, an exit status."""

    #: the command line's exit status for this error (2: the input is wrong; 1: it failed)
    exit_code: ClassVar[int] = 2
    #: the line above the problems when an error carries several
    headline: ClassVar[str] = "failed:"
    #: the problems, one line each (empty: the message says it all)
    problems: Sequence[str] = ()
    #: what the command was doing, set by the command where the error alone does not say
    context: str | None = None

    def within(self, context: str) -> KibanError:
        """This error, reported as having happened while doing *context*."""
        self.context = context
        return self

    def lines(self) -> list[str]:
        """What the command line prints after ``error:``, line by line."""
        if self.problems:
            head = f"{self.context}:" if self.context else self.summary()
            return [head, *(f"  - {problem}" for problem in self.problems)]
        text = str(self)
        return [f"{self.context}: {text}" if self.context else text]

    def summary(self) -> str:
        """The line above the problems (the class's ``headline`` unless overridden)."""
        return self.headline
