"""Property-based tests (hypothesis): the config loader and the SSE handling.

* Any tree given to the config loader yields a configuration or a ConfigError
  whose every problem names a key path; nothing else escapes.
* A stream cut into chunks anywhere gives the same relayed bytes, event count,
  usage and end state and, through the structured accumulator, the same bytes and
  content.
"""

from __future__ import annotations

import itertools
import json
import string

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kiban.config import ConfigError, KibanConfig, parse_config
from kiban.gateway.limits import LocalLimitStore, wait_for
from kiban.gateway.sse import EventStream
from kiban.structured.stream import DONE_EVENT, StreamAccumulator

BASE = {
    "gateway": {"port": 8080},
    "engines": [{"name": "e", "kind": "vllm", "url": "http://127.0.0.1:9000", "models": ["m"]}],
    "routes": [{"model": "m", "engines": ["e"]}],
}
KEYS = [
    ("gateway", "port"),
    ("gateway", "workers"),
    ("gateway", "limits"),
    ("gateway", "shared_state"),
    ("gateway", "http"),
    ("gateway", "api_keys"),
    ("engines", 0, "max_queue"),
    ("engines", 0, "queue_timeout_s"),
    ("engines", 0, "url"),
    ("engines", 0, "kind"),
    ("routes", 0, "timeouts"),
    ("routes", 0, "engines"),
    ("routes", 0, "strategy"),
    ("routes",),
    ("engines",),
]

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**40), 2**40)
    | st.floats(allow_nan=False)
    | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.text(string.ascii_lowercase + "_", max_size=12), inner, max_size=4)
    ),
    max_leaves=12,
)


def _set(tree: dict, path: tuple, value: object) -> dict:
    """*tree* with *value* at *path*; unchanged where an earlier edit removed the path."""
    tree = json.loads(json.dumps(tree))
    node = tree
    try:
        for part in path[:-1]:
            node = node[part]
        node[path[-1]] = value
    except (KeyError, IndexError, TypeError):
        pass
    return tree


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(KEYS), json_values), max_size=4), json_values)
def test_config_loader_answers_with_a_config_or_named_problems(edits, extra) -> None:
    tree = BASE
    for path, value in edits:
        tree = _set(tree, path, value)
    for raw in (tree, extra):
        try:
            assert isinstance(parse_config(raw, env={}), KibanConfig)
        except ConfigError as err:
            assert err.problems
            for problem in err.problems:
                assert isinstance(problem, str) and ": " in problem, problem


def _sse(events: list[dict], usage: dict | None) -> bytes:
    out = b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events)
    if usage is not None:
        out += b"data: " + json.dumps({"choices": [], "usage": usage}).encode() + b"\n\n"
    return out + DONE_EVENT


chunk_events = st.lists(
    st.fixed_dictionaries(
        {
            "choices": st.lists(
                st.fixed_dictionaries(
                    {
                        "index": st.integers(0, 2),
                        "delta": st.fixed_dictionaries({"content": st.text(max_size=12)}),
                        "finish_reason": st.none() | st.just("stop"),
                    }
                ),
                min_size=1,
                max_size=2,
            )
        }
    ),
    max_size=12,
)
usages = st.none() | st.fixed_dictionaries(
    {"prompt_tokens": st.integers(0, 10**6), "completion_tokens": st.integers(0, 10**6)}
)


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points) if b > a]


@settings(max_examples=300, deadline=None)
@given(chunk_events, usages, st.booleans(), st.lists(st.integers(0, 10**6), max_size=30))
def test_event_stream_does_not_depend_on_chunk_boundaries(events, usage, crlf, cuts) -> None:
    data = _sse(events, usage)
    if crlf:
        data = data.replace(b"\n", b"\r\n")
    stream = EventStream()
    relayed = b"".join(stream.feed(chunk) for chunk in _split(data, cuts))
    stream.close()
    assert relayed == data.replace(b"\r\n", b"\n")
    assert stream.events == data.count(b"\n\n") + data.count(b"\r\n\r\n")
    assert stream.done and stream.complete and stream.error is None
    assert stream.usage == (usage if usage else None)
    finished = {c["index"] for e in events for c in e["choices"] if c["finish_reason"]}
    assert stream.finished == finished


@settings(max_examples=300, deadline=None)
@given(chunk_events, st.lists(st.integers(0, 10**6), max_size=30))
def test_accumulator_output_does_not_depend_on_chunk_boundaries(events, cuts) -> None:
    data = _sse(events, None)
    whole = StreamAccumulator()
    whole_out = whole.feed(data)
    split = StreamAccumulator()
    split_out = b"".join(split.feed(chunk) for chunk in _split(data, cuts))
    assert split_out == whole_out == data.removesuffix(DONE_EVENT)
    assert split.choices() == whole.choices() and split.done and whole.done
    for index, (content, _reason) in enumerate(split.choices()):
        sent = [
            c["delta"]["content"]
            for e in events
            for c in e["choices"]
            if c["index"] == sorted({c["index"] for e in events for c in e["choices"]})[index]
        ]
        assert content == ("".join(sent) or None)


@settings(max_examples=200, deadline=None)
@given(
    st.integers(1, 10_000) | st.none(),
    st.integers(1, 10**6) | st.none(),
    st.lists(st.integers(0, 5000), max_size=20),
)
def test_limiter_never_admits_past_the_budget(rpm, tpm, wants) -> None:
    """Without time passing, admissions never exceed the requests nor the tokens per minute."""
    from kiban.config import RateLimits

    limits = RateLimits(requests_per_minute=rpm, tokens_per_minute=tpm)
    store = LocalLimitStore()
    admitted = []
    for want in wants:
        wait, which = store.admit_now("k", limits, want)
        if wait == 0:
            admitted.append(want)
        else:
            assert which in ("requests_per_minute", "tokens_per_minute") and wait > 0
    if rpm is not None:
        assert len(admitted) <= rpm
    if tpm is not None and admitted:
        assert sum(admitted[:-1]) < tpm  # the last one may take the bucket into debt
    assert wait_for(limits, float(rpm or 0), float(tpm or 0), 0)[0] == 0.0
