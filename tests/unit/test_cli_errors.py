"""kiban's own exceptions share one root, and the command line reports it once, the same way."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from collections.abc import Iterator

import pytest
from typer.testing import CliRunner

import kiban
from kiban.cli import app
from kiban.config import ConfigError
from kiban.deploy.supervisor import SupervisorError
from kiban.errors import KibanError


def _modules() -> Iterator[object]:
    for info in pkgutil.walk_packages(kiban.__path__, "kiban."):
        if not info.name.endswith("__main__"):
            yield importlib.import_module(info.name)


def test_every_public_exception_of_kiban_has_the_root() -> None:
    found = {
        f"{module.__name__}.{name}": cls
        for module in _modules()
        for name, cls in inspect.getmembers(module, inspect.isclass)
        if issubclass(cls, BaseException)
        and cls.__module__ == module.__name__
        and not name.startswith("_")
    }
    assert len(found) >= 23
    assert [name for name, cls in found.items() if not issubclass(cls, KibanError)] == []


class _Boom(KibanError):
    exit_code = 3


@pytest.fixture
def boom_command() -> Iterator[str]:
    """A command that raises a KibanError, registered on the real app for one test."""

    @app.command("boom-for-test")
    def boom() -> None:
        raise _Boom("the [bold]thing[/] broke")

    try:
        yield "boom-for-test"
    finally:
        app.registered_commands.pop()


def test_the_cli_reports_any_kiban_error_once(boom_command: str) -> None:
    result = CliRunner().invoke(app, [boom_command])
    assert result.exit_code == 3
    assert result.output == "error: the [bold]thing[/] broke\n"  # no markup, no traceback
    assert not isinstance(result.exception, KibanError)  # caught, turned into the exit status


def test_an_error_from_a_real_command_has_its_exit_code() -> None:
    result = CliRunner().invoke(app, ["report", "--prometheus", "http://127.0.0.1:1"])
    assert result.exit_code == 2
    assert result.output.startswith("error: cannot reach Prometheus at http://127.0.0.1:1")
    assert "Traceback" not in result.output


def test_problems_print_under_a_headline_or_the_commands_context() -> None:
    config = ConfigError(["a: bad", "b: worse"], "kiban.yaml")
    assert config.lines() == ["kiban.yaml is invalid:", "  - a: bad", "  - b: worse"]
    up = SupervisorError(["engine 'x' died"])
    assert (up.exit_code, up.lines()) == (1, ["kiban up failed:", "  - engine 'x' died"])
    assert up.within("cannot run it").lines() == ["cannot run it:", "  - engine 'x' died"]
    assert _Boom("no").within("kiban down").lines() == ["kiban down: no"]
