"""``kiban.extract``: a validated Pydantic instance from a chat, through kiban.

Built on the official openai SDK: ``client.chat.completions.parse`` sends the
model's JSON Schema as ``response_format`` (strict), kiban has the engine
enforce it and verifies the output, and the SDK validates it into the model.

    person = kiban.extract(Person, [{"role": "user", "content": text}], model="qwen")
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, TypeVar

from pydantic import BaseModel, ValidationError

from kiban.errors import KibanError

if TYPE_CHECKING:
    from openai import AsyncOpenAI, LengthFinishReasonError, OpenAI
    from openai.types.chat import ChatCompletionMessageParam, ParsedChatCompletion

T = TypeVar("T", bound=BaseModel)

DEFAULT_URL = "http://127.0.0.1:8080/v1"
URL_ENV = "KIBAN_URL"
KEY_ENV = "KIBAN_API_KEY"


class ExtractionError(KibanError, RuntimeError):
    """No valid instance: kiban's error code (``structured_output_*``) and JSON pointer."""

    def __init__(self, message: str, code: str | None = None, pointer: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.pointer = pointer


def extract(
    model_type: type[T],
    messages: Iterable[ChatCompletionMessageParam],
    *,
    model: str,
    client: OpenAI | None = None,
    base_url: str | None = None,
    api_key: str | None = None,
    **create_args: Any,
) -> T:
    """Ask *model* for an instance of *model_type*; raise :class:`ExtractionError` if none.

    *client* defaults to an ``openai.OpenAI`` for ``$KIBAN_URL`` (or
    http://127.0.0.1:8080/v1) with ``$KIBAN_API_KEY``; *create_args* go to the
    SDK (``max_tokens``, ``temperature``, ``extra_body`` ...).
    """
    import openai

    client = client or openai.OpenAI(**_client_args(base_url, api_key))
    try:
        completion = client.chat.completions.parse(
            model=model, messages=list(messages), response_format=model_type, **create_args
        )
    except openai.LengthFinishReasonError as err:
        return _complete_at_length(err, model_type)
    except openai.APIStatusError as err:
        raise _extraction_error(err) from err
    return _parsed(completion, model_type)


async def aextract(
    model_type: type[T],
    messages: Iterable[ChatCompletionMessageParam],
    *,
    model: str,
    client: AsyncOpenAI | None = None,
    base_url: str | None = None,
    api_key: str | None = None,
    **create_args: Any,
) -> T:
    """:func:`extract` with ``openai.AsyncOpenAI``."""
    import openai

    client = client or openai.AsyncOpenAI(**_client_args(base_url, api_key))
    try:
        completion = await client.chat.completions.parse(
            model=model, messages=list(messages), response_format=model_type, **create_args
        )
    except openai.LengthFinishReasonError as err:
        return _complete_at_length(err, model_type)
    except openai.APIStatusError as err:
        raise _extraction_error(err) from err
    return _parsed(completion, model_type)


def _client_args(base_url: str | None, api_key: str | None) -> dict[str, Any]:
    return {
        "base_url": base_url or os.environ.get(URL_ENV) or DEFAULT_URL,
        "api_key": api_key or os.environ.get(KEY_ENV) or "kiban",
    }


def _parsed(completion: ParsedChatCompletion[T], model_type: type[T]) -> T:
    message = completion.choices[0].message
    if message.parsed is None:
        reason = message.refusal or f"finish_reason {completion.choices[0].finish_reason!r}"
        raise ExtractionError(f"no {model_type.__name__} in the response: {reason}")
    return message.parsed


def _complete_at_length(err: LengthFinishReasonError, model_type: type[T]) -> T:
    """The instance in an answer that stopped at ``max_tokens`` once its JSON was complete.

    kiban returns such an answer as a success only after checking it against the whole
    schema (the JSON closed on the last token the budget allowed); the SDK's ``parse``
    refuses every ``finish_reason: length``, so the content is validated here instead.
    """
    content = err.completion.choices[0].message.content or ""
    try:
        return model_type.model_validate_json(content)
    except ValidationError as invalid:
        raise ExtractionError(
            f"no {model_type.__name__} in the response: it stopped at max_tokens "
            f"(finish_reason 'length'); raise max_tokens",
            "structured_output_truncated",
        ) from invalid


def _extraction_error(err: Any) -> ExtractionError | Any:
    body = err.body if isinstance(err.body, dict) else {}
    error = body.get("error", body) if isinstance(body, dict) else {}
    code = error.get("code") if isinstance(error, dict) else None
    if isinstance(code, str) and code.startswith("structured_output_"):
        return ExtractionError(str(error.get("message", err)), code, error.get("pointer"))
    return err
