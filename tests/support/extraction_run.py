"""One extraction case through a kiban gateway in one of four modes, checked and scored.

Modes (the same messages each time, see `messages`; only the constraint differs):

- ``prompt``: the prompt asks for JSON, nothing is enforced;
- ``json_object``: ``response_format: {"type": "json_object"}``;
- ``json_schema``: ``response_format`` json_schema with the Pydantic model's schema,
  enforced by the engine through kiban and verified by kiban;
- ``extract``: ``kiban.aextract`` (the openai SDK's ``parse``, strict schema).

Every answer kiban returns as a success is checked again here, independently of
kiban: JSON (orjson, after removing one surrounding Markdown code fence, as
applications do with prompted JSON), then the model's JSON Schema (the
``jsonschema`` package, formats asserted) and Pydantic in strict mode. What fails
is counted as a parse failure or a schema violation *returned as success*; an
error answer (kiban's 422 with its code, a 400, a timeout) is counted as an error.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import asdict, dataclass
from functools import cache
from typing import Any

import httpx
import orjson
from jsonschema import Draft202012Validator
from pydantic import BaseModel, ValidationError

from kiban.models.smollm2 import SYSTEM_PROMPT
from tests.support.extraction_cases import Case, score

MODES = ("prompt", "json_object", "json_schema", "extract")
ENFORCED_MODES = ("json_schema", "extract")
#: 1.4 times the longest right answer (222 tokens, indented JSON): room to finish, and a
#: bound on what a runaway costs
MAX_TOKENS = 320
_QUOTED_NUMBER = re.compile(r'"(<(?:integer|number)[^"]*>)"')
_FENCE = re.compile(r"^```(?:json)?\s*\n(.*)\n```$", re.DOTALL)


@dataclass
class Outcome:
    """What one request gave: status ok | parse_failure | schema_violation | error."""

    case_id: str
    schema: str
    lang: str
    engine: str
    mode: str
    status: str
    code: str | None
    correct: int
    fields: int
    latency_s: float
    completion_tokens: int
    content: str

    def record(self) -> dict[str, Any]:
        return asdict(self)


def answer_template(schema: dict[str, Any], node: dict[str, Any] | None = None) -> Any:
    """The JSON the answer should look like, with ``<what goes here>`` in place of values.

    A 135M model copies a form far better than it reads a JSON Schema (given the
    schema, SmolLM2 mostly echoes it back), so the prompt shows this form.
    """
    node = schema if node is None else node
    if "$ref" in node:
        node = schema["$defs"][node["$ref"].rsplit("/", 1)[-1]]
    if "enum" in node:
        return "<one of: " + " | ".join(str(v) for v in node["enum"]) + ">"
    kind, description = node.get("type"), node.get("description")
    if kind == "object":
        return {key: answer_template(schema, value) for key, value in node["properties"].items()}
    if kind == "array":
        return [answer_template(schema, node["items"])]
    if node.get("format") == "date":
        return "<YYYY-MM-DD>"
    if kind == "integer" and "minimum" in node:
        return f"<integer from {node['minimum']} to {node['maximum']}>"
    if kind in ("integer", "number"):
        return f"<{kind}: {description}>" if description else f"<{kind}>"
    return f"<{description}>" if description else "<text>"


def messages(case: Case) -> list[dict[str, str]]:
    """System prompt, then the answer's form and the text (the same in every mode)."""
    form = json.dumps(answer_template(case.model.model_json_schema()), ensure_ascii=False)
    form = _QUOTED_NUMBER.sub(r"\1", form)  # numbers unquoted: <integer from 1 to 500>
    user = (
        "Extract the data from the text below. Answer with one JSON object in this form, "
        f"and nothing else:\n{form}\n\nText: {case.text}"
    )
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]


def request_fields(case: Case, mode: str) -> dict[str, Any]:
    """The constraint of *mode* as chat-completion fields (``extract`` lets the SDK add it)."""
    if mode == "json_object":
        return {"response_format": {"type": "json_object"}}
    if mode == "json_schema":
        model = case.model
        schema = {"name": model.__name__, "schema": model.model_json_schema(), "strict": True}
        return {"response_format": {"type": "json_schema", "json_schema": schema}}
    return {}


@cache
def _validator(model: type[BaseModel]) -> Draft202012Validator:
    schema = model.model_json_schema()
    return Draft202012Validator(schema, format_checker=Draft202012Validator.FORMAT_CHECKER)


def check(model: type[BaseModel], content: str) -> tuple[str, Any]:
    """(status, parsed JSON or None) of content returned as a success."""
    text = content.strip()
    if fenced := _FENCE.match(text):
        text = fenced.group(1)
    try:
        data = orjson.loads(text)
    except orjson.JSONDecodeError:
        return "parse_failure", None
    if not _validator(model).is_valid(data):
        return "schema_violation", data
    try:
        model.model_validate_json(text, strict=True)
    except ValidationError:
        return "schema_violation", data
    return "ok", data


class ExtractionClient:
    """Runs cases against one gateway route; one request at a time."""

    def __init__(self, base_url: str, route: str, engine: str, timeout_s: float = 300.0) -> None:
        import openai

        self.route, self.engine = route, engine
        self.http = httpx.AsyncClient(base_url=base_url, timeout=timeout_s)
        self._last_body: dict[str, Any] = {}
        sdk_http = httpx.AsyncClient(timeout=timeout_s, event_hooks={"response": [self._keep]})
        self.sdk = openai.AsyncOpenAI(
            base_url=f"{base_url}/v1", api_key="kiban", max_retries=0, http_client=sdk_http
        )

    async def _keep(self, response: httpx.Response) -> None:
        """Keep the last chat-completion body the SDK received (its usage and raw content)."""
        await response.aread()
        try:
            self._last_body = response.json()
        except ValueError:
            self._last_body = {}

    async def aclose(self) -> None:
        await self.http.aclose()
        await self.sdk.close()

    async def run(self, case: Case, mode: str, max_tokens: int = MAX_TOKENS) -> Outcome:
        """Send *case* in *mode*; the outcome with fields scored against the truth."""
        started = time.perf_counter()
        if mode == "extract":
            status, code, body = await self._extract(case, max_tokens)
        else:
            status, code, body = await self._post(case, mode, max_tokens)
        latency = time.perf_counter() - started
        content, data = "", None
        if status == 200:
            content = body["choices"][0]["message"].get("content") or ""
            status_text, data = check(case.model, content)
        else:
            status_text = "error"
        correct, fields = score(case.truth, data)
        tokens = (body.get("usage") or {}).get("completion_tokens", 0) if status == 200 else 0
        return Outcome(
            case.id,
            case.schema,
            case.lang,
            self.engine,
            mode,
            status_text,
            code,
            correct if status_text != "error" else 0,
            fields,
            round(latency, 4),
            tokens,
            content[:400],
        )

    async def _post(self, case: Case, mode: str, max_tokens: int) -> tuple[int, str | None, Any]:
        body = {
            "model": self.route,
            "messages": messages(case),
            "max_tokens": max_tokens,
            "temperature": 0,
            **request_fields(case, mode),
        }
        try:
            resp = await self.http.post("/v1/chat/completions", json=body)
        except httpx.HTTPError as exc:
            return 0, type(exc).__name__, {}
        is_json = resp.headers.get("content-type", "").startswith("application/json")
        data = resp.json() if is_json else {}
        if resp.status_code != 200:
            return resp.status_code, _error_code(resp.status_code, data), data
        return 200, None, data

    async def _extract(self, case: Case, max_tokens: int) -> tuple[int, str | None, Any]:
        import openai

        import kiban

        self._last_body = {}
        try:
            await kiban.aextract(
                case.model,
                messages(case),
                model=self.route,
                client=self.sdk,
                max_tokens=max_tokens,
                temperature=0,
            )
        except kiban.ExtractionError as exc:
            if exc.code is None:  # a 200 the SDK found no instance in: judged by check()
                return 200, None, self._last_body
            return 422, exc.code, self._last_body
        except openai.APIStatusError as exc:
            return exc.status_code, _error_code(exc.status_code, self._last_body), self._last_body
        except openai.APIConnectionError as exc:
            return 0, type(exc).__name__, {}
        except (openai.APIError, ValidationError):  # a 200 the SDK could not parse: check()
            return 200, None, self._last_body
        return 200, None, self._last_body


def _error_code(status: int, body: Any) -> str:
    error = body.get("error") if isinstance(body, dict) else None
    code = error.get("code") if isinstance(error, dict) else None
    return str(code or f"http_{status}")
