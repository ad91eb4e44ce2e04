"""Runs INSIDE the structured-protocols venv: check one request body against an engine's code.

    python protocol_check.py lmdeploy|sglang < body.json

Loads only the engine's protocol module (its package ``__init__`` would import torch),
validates the body with the engine's own ``ChatCompletionRequest``, then runs the
engine's own code that turns the request into its grammar input, and prints a JSON
report: fields the request model does not know (silently ignored by the engine), and
the constraint the engine would enforce.
"""

from __future__ import annotations

import importlib
import json
import sys
import sysconfig
import types
from pathlib import Path

SITE = Path(sysconfig.get_paths()["purelib"])


def skip_package_init(*names: str) -> None:
    """Make each of *names* importable as a bare package, without running its __init__."""
    for name in names:
        module = types.ModuleType(name)
        module.__path__ = [str(SITE / name.replace(".", "/"))]
        sys.modules[name] = module


def unknown_fields(model: type, body: dict) -> list[str]:
    known = set()
    for name, field in model.model_fields.items():
        known.add(name)
        if field.alias:
            known.add(field.alias)
    return sorted(set(body) - known)


def lmdeploy(body: dict) -> dict:
    skip_package_init("lmdeploy", "lmdeploy.serve", "lmdeploy.serve.openai")
    protocol = importlib.import_module("lmdeploy.serve.openai.protocol")
    guided = importlib.import_module("lmdeploy._guided_decoding")
    request = protocol.ChatCompletionRequest.model_validate(body)
    constraint = None
    if request.response_format is not None and request.response_format.type != "text":
        # lmdeploy/serve/parsers/response_parser.py: the format goes on as model_dump()
        kind, source = guided._grammar_source(request.response_format.model_dump())
        constraint = {"kind": kind, "source": source}
    return {
        "unknown_fields": unknown_fields(protocol.ChatCompletionRequest, body),
        "constraint": constraint,
    }


def sglang(body: dict) -> dict:
    skip_package_init("sglang")
    protocol = importlib.import_module("sglang.srt.entrypoints.openai.protocol")
    request = protocol.ChatCompletionRequest.model_validate(body)
    params = request.to_sampling_params(stop=[], model_generation_config={})
    keys = ("json_schema", "regex", "ebnf", "structural_tag")
    return {
        "unknown_fields": unknown_fields(protocol.ChatCompletionRequest, body),
        "constraint": {k: params[k] for k in keys if params.get(k) is not None},
        "max_new_tokens": params.get("max_new_tokens"),
    }


def main() -> None:
    body = json.load(sys.stdin)
    report = {"lmdeploy": lmdeploy, "sglang": sglang}[sys.argv[1]](body)
    json.dump(report, sys.stdout)


if __name__ == "__main__":
    main()
