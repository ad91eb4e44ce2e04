"""Core lists in Linux's cpulist form, and the even split of cores among CPU engines."""

from __future__ import annotations

import pytest

from kiban.cpulist import format_cpu_list, parse_cpu_list, split_cores


@pytest.mark.parametrize(
    ("text", "cores"),
    [("0", (0,)), ("0-3", (0, 1, 2, 3)), ("8,0-1", (0, 1, 8)), (" 2 , 4-5", (2, 4, 5))],
)
def test_cpu_lists_round_trip(text: str, cores: tuple[int, ...]) -> None:
    assert parse_cpu_list(text) == cores
    assert parse_cpu_list(format_cpu_list(cores)) == cores


def test_format_joins_runs() -> None:
    assert format_cpu_list([5, 0, 1, 2, 7, 8]) == "0-2,5,7-8"


@pytest.mark.parametrize(("text", "part"), [("a", "'a'"), ("3-1", "'3-1'"), ("1,1", "twice")])
def test_bad_cpu_lists_name_the_part(text: str, part: str) -> None:
    with pytest.raises(ValueError, match=part):
        parse_cpu_list(text)


def test_split_gives_the_first_engines_the_odd_cores() -> None:
    cores, warnings = split_cores(["a", "b", "c"], {}, range(8))
    assert cores == {"a": (0, 1, 2), "b": (3, 4, 5), "c": (6, 7)} and warnings == []


def test_fixed_cores_are_kept_and_left_out_of_the_split() -> None:
    cores, _ = split_cores(["a", "b"], {"a": (0,)}, range(4))
    assert cores == {"a": (0,), "b": (1, 2, 3)}
